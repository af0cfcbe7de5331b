"""Atomic writes, the one policy for every file the plugin writes: a hidden temporary sibling, then ``os.replace``.

A file under its final name is therefore always complete: an interrupted run leaves the previous file or
none, never half of one, and no temporary behind. Temporary names never end in the final suffix (``.pt``,
``.tar``, ...), so globs such as OpenCLIP's ``--resume latest`` never pick one up.
"""
import contextlib
import os

_TMP_MARK = '.tmp-'


def temporary_name(path) -> str:
    """A hidden sibling of ``path`` that no checkpoint glob (``*.pt``) matches."""
    folder, name = os.path.split(os.path.abspath(os.fspath(path)))
    return os.path.join(folder, f'.{name}{_TMP_MARK}{os.getpid()}')


def _fsync(path):
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_write(path, mode='w', **open_kwargs):
    """``open(path, mode)`` that leaves either the complete new file or the previous one, never a partial one."""
    tmp = temporary_name(path)
    try:
        with open(tmp, mode, **open_kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def atomic_torch_save(save, obj, path, *args, **kwargs):
    """``save(obj, path, ...)`` (torch.save's signature) through a temporary file and ``os.replace``."""
    tmp = temporary_name(path)
    try:
        save(obj, tmp, *args, **kwargs)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise



@contextlib.contextmanager
def atomic_path(path):
    """A temporary path to write ``path``'s content to (by any writer: tarfile, PIL, torch.save); renamed to
    ``path`` when the block completes, removed when it fails."""
    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave the temporary file behind
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def json_safe(value):
    """``value`` with every non-finite float (NaN, inf: e.g. undefined metrics) replaced by None, recursively through
    dicts, lists and tuples, so ``json.dump(..., allow_nan=False)`` writes valid JSON (null), not ``NaN``."""
    import math

    import numpy as np
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value
