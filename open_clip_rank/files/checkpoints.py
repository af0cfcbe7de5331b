"""Checkpoint files: telling an unreadable (truncated, corrupt) file from a good one, atomic writes, resume.

* ``unreadable_reason(path)``: the file's integrity (``integrity.py``: the plugin's checksum, else the
  format's own CRC-32s), which catches a file cut short by an interrupted write and a flipped bit alike;
* ``reading_checkpoint(path)``: turns torch's raw ``PytorchStreamReader`` / EOF errors into one
  ``UnreadableCheckpointError`` line naming the file and the fix;
* checkpoints of a training run are written with ``atomic.atomic_torch_save`` (``integration/hook.py``);
* ``load_resume_checkpoint``: OpenCLIP's resume load, skipping unreadable checkpoints under
  ``--resume latest`` with a warning.

Imports no ``open_clip_train`` module (the rank CLI uses it too).
"""
import contextlib
import errno
import glob
import logging
import os
import pickle
import re
import struct
import zipfile
from typing import Optional

from .integrity import verify_file


_logger = logging.getLogger(__name__)

class UnreadableCheckpointError(ValueError):
    """The checkpoint file is truncated or corrupt (e.g. its write was interrupted)."""


def unreadable_reason(path) -> Optional[str]:
    """Why ``path`` is not an intact checkpoint (cut short, a flipped bit, not a checkpoint at all), or None.

    ``integrity.verify_file``: the plugin's checksum where the file carries one, else the format's own checks
    (a torch zip archive's CRC-32s, a safetensors header); cached per file version, so checking at the start
    of a run and again at the load costs one verification.
    """
    return verify_file(path)


_DAMAGE_MARKERS = ('PytorchStreamReader', 'zip archive', 'central directory', 'unexpected EOF', 'Ran out of input',
                   'invalid load key', 'Error while deserializing header', 'incomplete metadata',
                   'file might be corrupted', 'truncated')


def is_unreadable_error(err: BaseException) -> bool:
    """Whether loading failed because the file is damaged (not, e.g., because of weights_only or a bad key)."""
    if isinstance(err, UnreadableCheckpointError):
        return True
    if isinstance(err, (EOFError, zipfile.BadZipFile, struct.error)):
        return True
    if isinstance(err, OSError) and err.errno == errno.EINVAL:  # fsspec seeking past the end of a cut file
        return True
    text = str(err)
    if 'Weights only load failed' in text:
        return False
    if isinstance(err, pickle.UnpicklingError):
        return True
    return any(m in text for m in _DAMAGE_MARKERS)


def _short(reason) -> str:
    """The first sentence of an error (torch's says it; the rest is advice), on one line."""
    return ' '.join(str(reason).split()).split('. ')[0][:200]


def unreadable_message(path, reason: str, fix: Optional[str] = None) -> str:
    fix = fix or ('Delete it and use an earlier checkpoint of the run, or train again; a file cut short is '
                  'left by an interrupted write.')
    reason = _short(reason)
    return f"checkpoint {path} cannot be read ({reason}): it is truncated or corrupt. {fix}"


def check_readable(path, fix: Optional[str] = None) -> None:
    """Raise ``UnreadableCheckpointError`` when the file does not verify (``unreadable_reason``)."""
    reason = unreadable_reason(path)
    if reason is not None:
        raise UnreadableCheckpointError(unreadable_message(path, reason, fix))


@contextlib.contextmanager
def reading_checkpoint(path, fix: Optional[str] = None):
    """Loading errors caused by a damaged file become one ``UnreadableCheckpointError`` line."""
    try:
        yield
    except UnreadableCheckpointError:
        raise
    except Exception as err:
        if not is_unreadable_error(err):
            raise
        raise UnreadableCheckpointError(unreadable_message(path, f'{type(err).__name__}: {err}', fix)) from None


# --- which weights a model holds ---------------------------------------------------------------------

_LOADED_ATTR = '_open_clip_rank_weights_from'
_BASE_ONLY_ATTR = '_open_clip_rank_base_weights_from'


def note_loaded(model, path, complete: bool = True) -> None:
    """Remember that ``path``'s weights went into ``model`` (set by the ``load_checkpoint`` patch).

    ``complete=False``: the file held base CLIP weights only (the towers); the family's own parameters (the
    adapter, the prompt learner) started fresh, so the model is not trained for ranking.
    """
    if complete:
        setattr(model, _LOADED_ATTR, str(path))
    elif loaded_from(model) is None:
        setattr(model, _BASE_ONLY_ATTR, str(path))


def loaded_from(model) -> Optional[str]:
    """The file whose weights fill every parameter of ``model`` (loaded through OpenCLIP), or None."""
    return getattr(model, _LOADED_ATTR, None)


def base_weights_from(model) -> Optional[str]:
    """The file that gave ``model`` its towers only (the family's own parameters random), or None."""
    return None if loaded_from(model) is not None else getattr(model, _BASE_ONLY_ATTR, None)



def is_path(f) -> bool:
    return isinstance(f, (str, os.PathLike))


def inside(folder, path) -> bool:
    """Whether ``path`` names a file directly inside ``folder``."""
    if not folder or not is_path(path) or '://' in os.fspath(path):
        return False
    return os.path.dirname(os.path.abspath(os.fspath(path))) == os.path.abspath(os.fspath(folder))


# --- resume --------------------------------------------------------------------------------------------

def natural_order(path):
    """'epoch_10.pt' after 'epoch_9.pt': digit runs compare as numbers (runs alternate str, int, str, ...)."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r'(\d+)', path.lower()))]


def resume_candidates(failed_path) -> list:
    """The other checkpoints ``--resume latest`` could have chosen, newest first (same folder, same rule; never the
    best checkpoint of ``--rank-save-best``, which is not the newest)."""
    from .best_checkpoint import is_best_checkpoint
    folder = os.path.dirname(os.fspath(failed_path))
    found = glob.glob(os.path.join(folder, '**', '*.pt'), recursive=True)
    failed = os.path.abspath(os.fspath(failed_path))
    return sorted((p for p in found if os.path.abspath(p) != failed and not is_best_checkpoint(p)),
                  key=natural_order, reverse=True)


def latest_regular_checkpoint(path: str) -> Optional[str]:
    """OpenCLIP's local ``get_latest_checkpoint`` search (``path + '**/*.pt'``, recursive, the last by its natural
    key) without the best checkpoint; None when nothing else is there."""
    from .best_checkpoint import is_best_checkpoint
    found = [p for p in glob.glob(path + '**/*.pt', recursive=True) if not is_best_checkpoint(p)]
    return sorted(found, key=natural_order)[-1] if found else None


def _load_intact(original_load, path, map_location):
    """(checkpoint, None) or (None, why the file is damaged): verified before loading, so a flipped bit is
    found too, not only the errors torch happens to raise on a cut file."""
    reason = unreadable_reason(path)
    if reason is not None:
        return None, reason
    try:
        return original_load(path, map_location=map_location), None
    except Exception as err:
        if not is_unreadable_error(err):
            raise
        return None, f'{type(err).__name__}: {err}'


def load_resume_checkpoint(original_load, file_path, map_location=None, run_args=None):
    """OpenCLIP's ``pt_load`` of the resume checkpoint, made safe against damaged files.

    Under ``--resume latest`` (``run_args.rank_resume_latest``), a damaged newest checkpoint is skipped
    with a warning and the newest intact one is loaded instead (``run_args.resume`` is updated, so the log
    names it). Otherwise a damaged file ends the run with one line naming it and the fix.
    """
    checkpoint, first_reason = _load_intact(original_load, file_path, map_location)
    if first_reason is None:
        return checkpoint
    latest = bool(run_args is not None and getattr(run_args, 'rank_resume_latest', False))
    if not latest or '://' in os.fspath(file_path):
        raise SystemExit('open_clip_rank: error: ' + unreadable_message(
            file_path, first_reason, 'Resume from an earlier checkpoint (--resume PATH), or delete it and use '
                                     '--resume latest.'))
    skipped = [(file_path, first_reason)]
    for candidate in resume_candidates(file_path):
        checkpoint, reason = _load_intact(original_load, candidate, map_location)
        if reason is not None:
            skipped.append((candidate, reason))
            continue
        for path, why in skipped:
            _logger.warning(f"--resume latest: skipping damaged checkpoint {path} "
                            f"({_short(why)}); it is truncated or corrupt, e.g. by an interrupted write.")
        _logger.warning(f"--resume latest: resuming from {candidate}, the newest intact checkpoint.")
        run_args.resume = candidate
        return checkpoint
    raise SystemExit(f"open_clip_rank: error: --resume latest found no readable checkpoint in "
                     f"{os.path.dirname(os.fspath(file_path))} ({len(skipped)} damaged: "
                     f"{', '.join(os.path.basename(p) for p, _ in skipped[:3])}); delete them to start the run "
                     f"afresh, or resume from a checkpoint elsewhere with --resume PATH.")
