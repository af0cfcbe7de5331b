"""Refuse a bad start before anything is created: one line each, naming the problem and the fix.

OpenCLIP's ``main`` creates ``logs/<name>`` right after parsing its arguments and only then builds the
model and reads the data, so a refusal there leaves the folder behind and the rerun with the same
``--name`` stops at "Experiment already exists" (exit code 0). ``check_training_start`` runs inside the
plugin's ``parse_args`` wrapper, before that folder exists: unknown ``--model``, a missing or unreadable
``--pretrained`` / ``--resume`` file (verified, ``files/integrity.py``), one made for another config (a dry-run
load into a meta-device model), a ``--pretrained`` that OpenCLIP would ignore, an experiment that already
exists, and bad rank CSVs (the same checks ``get_data`` runs later). Refusals exit with status 2.

``unknown_model_message`` and ``check_model_name`` serve the rank CLI and ``load_rank_model`` as well.
Imports no ``open_clip_train`` module at import time.
"""
import difflib
import logging
import os
import sys
from typing import Optional

from .. import registry
from . import compat
from .run_state import start_run

_logger = logging.getLogger(__name__)

class StartRefused(ValueError):
    """A training run or a ranking that must not start; the message is one line with the fix."""


def refuse(message: str, prog: str = 'open_clip_rank'):
    """Print one error line and exit with status 2 (a usage error), as argparse does."""
    print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


# --- model names ---------------------------------------------------------------------------------------

def closest_model_names(name: str, limit: int = 3):
    import open_clip
    names = open_clip.list_models()
    by_lower = {n.lower(): n for n in names}
    found = difflib.get_close_matches(name.lower(), list(by_lower), n=limit, cutoff=0.6)
    return [by_lower[n] for n in found]


def unknown_model_message(name: str) -> Optional[str]:
    """None when ``name`` resolves to a model config OpenCLIP can build; else one line with the closest names."""
    import open_clip
    schema, identifier = compat.split_model_name(name)
    if schema == 'local-dir':
        config = os.path.join(identifier, 'open_clip_config.json')
        if not os.path.isfile(config):
            return (f"model {name}: {config} does not exist; a local-dir: model is a folder with "
                    f"open_clip_config.json (and optionally its weights).")
        return None
    if schema is not None:  # hf-hub: resolved (and reported) by OpenCLIP, which may need the network
        return None
    if open_clip.get_model_config(identifier.replace('/', '-')) is not None:
        return None
    close = closest_model_names(identifier)
    hint = f"closest: {', '.join(close)}" if close else 'no similar name'
    return (f"unknown model '{name}' ({hint}); open_clip.list_models() lists all {len(open_clip.list_models())}, "
            f"and OPEN_CLIP_RANK_MODEL_CONFIGS=DIR adds config files of your own.")


def check_model_name(name: str) -> None:
    message = unknown_model_message(name)
    if message is not None:
        raise StartRefused(message)


# --- training -------------------------------------------------------------------------------------------

def _check_pretrained(args):
    pretrained = getattr(args, 'pretrained', None)
    if not pretrained:
        return
    schema, identifier = compat.split_model_name(args.model)
    if schema is not None:
        if registry.family_for_model_name(args.model) is not None:  # OpenCLIP only warns and trains from random weights
            raise StartRefused(
                f"--pretrained {pretrained} would be ignored: OpenCLIP loads {schema}: models only from their own "
                f"source. Put the weights in the {schema} source (e.g. open_clip_model.safetensors beside "
                f"open_clip_config.json), or register the config by name (OPEN_CLIP_RANK_MODEL_CONFIGS=DIR, "
                f"--model NAME) and pass --pretrained {pretrained}.")
        return
    if os.path.isfile(pretrained):
        from ..files.checkpoints import check_readable
        check_readable(pretrained, fix='Pass a complete checkpoint with --pretrained.')
        return
    import open_clip
    model = identifier.replace('/', '-')
    if not open_clip.get_pretrained_cfg(model, pretrained):
        tags = open_clip.list_pretrained_tags_by_model(model)
        known = f"its tags: {', '.join(tags)}" if tags else 'it has no pretrained tags'
        raise StartRefused(f"--pretrained {pretrained} is neither a file nor a pretrained tag of {args.model} "
                           f"({known}).")


def _check_resume(args):
    resume = getattr(args, 'resume', None)
    if not resume or resume == 'latest' or '://' in resume:
        return
    if not os.path.isfile(resume):
        raise StartRefused(f"--resume {resume} does not exist; give a checkpoint file or --resume latest.")
    from ..files.checkpoints import check_readable
    check_readable(resume, fix='Resume from an earlier checkpoint of the run (--resume PATH or --resume latest).')


def _meta_model(args):
    """The run's model on the meta device (shapes only: no memory, no initialisation cost, no download), built as
    OpenCLIP's ``main`` builds it, or None when it cannot be built that way (the load then reports as usual)."""
    import warnings

    import numpy as np
    import open_clip
    import torch
    if compat.split_model_name(args.model)[0] is not None:
        return None  # hf-hub: / local-dir: sources bring their own weights
    image_size = getattr(args, 'force_image_size', None)
    if isinstance(image_size, (tuple, list)) and len(image_size) == 1:
        image_size = image_size[0]
    kwargs = {'init_logit_scale': np.log(10), 'init_logit_bias': -10} if getattr(args, 'siglip', False) else {}
    try:
        with torch.device('meta'), warnings.catch_warnings():
            warnings.simplefilter('ignore')
            return open_clip.create_model(
                args.model, None, device='meta', force_quick_gelu=getattr(args, 'force_quick_gelu', False),
                force_custom_text=getattr(args, 'force_custom_text', False), force_image_size=image_size,
                force_context_length=getattr(args, 'force_context_length', None), pretrained_image=False,
                output_dict=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - a model only its real build can make: checked at the load
        _logger.debug(f"start check: {args.model} cannot be built on the meta device ({err}); weights checked at load")
        return None


def _load_on_meta(load, path):
    """Run ``load`` (a weights load into a meta-device model: shapes and keys compared, nothing copied), for torch
    zip files with memory-mapped loading, so the check reads no tensor data."""
    import warnings

    import torch.utils.serialization as serialization
    from ..files.integrity import ZIP_MAGIC
    with open(path, 'rb') as f:
        zip_file = f.read(4) == ZIP_MAGIC
    mmap, serialization.config.load.mmap = serialization.config.load.mmap, zip_file
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # "copying ... to a meta parameter is a no-op"
            load()
    finally:
        serialization.config.load.mmap = mmap


def _first_line(err) -> str:
    return ' '.join(str(err).split())[:300]


def _check_weights_fit(args):
    """A ``--pretrained`` / ``--resume`` file made for another config is found now (dry-run loads into a meta-device
    model, through the same code as the real loads), not after OpenCLIP has created ``logs/<name>``."""
    pretrained = getattr(args, 'pretrained', None)
    resume = getattr(args, 'resume', None)
    files = [(flag, path) for flag, path in (('--pretrained', pretrained), ('--resume', resume))
             if path and path != 'latest' and '://' not in path and os.path.isfile(path)
             and not path.endswith(('.npz', '.npy'))]
    model = _meta_model(args) if files else None
    if model is None:
        return
    import open_clip
    import torch

    from ..models.checkpoint import checkpoint_source
    for flag, path in files:
        def load(flag=flag, path=path):
            if flag == '--pretrained':
                open_clip.load_checkpoint(model, path)
                return
            checkpoint = torch.load(path, map_location='cpu', weights_only=True)
            state_dict = checkpoint['state_dict'] if 'epoch' in checkpoint else checkpoint  # as OpenCLIP's resume
            with checkpoint_source(path):  # named in a rank model's mismatch error
                model.load_state_dict({k.removeprefix('module.'): v for k, v in state_dict.items()})
        try:
            _load_on_meta(load, path)
        except ValueError:  # CheckpointMismatchError, UnreadableCheckpointError: already one line
            raise
        except Exception as err:  # noqa: BLE001 - OpenCLIP's / torch's own mismatch errors, made one line
            if 'Weights only load failed' in str(err):
                continue  # the real load decides (e.g. a checkpoint holding other objects)
            raise StartRefused(f"{flag} {path} does not fit --model {args.model}: {_first_line(err)}; train or "
                               f"resume with the model config the checkpoint was made with.") from None


def _check_new_experiment(args):
    """OpenCLIP's own refusal of an existing experiment (same condition), but before anything happens and
    with a non-zero exit status."""
    if not args.name or not args.logs or args.resume == 'latest' or getattr(args, 'log_local', False):
        return
    log_path = os.path.join(args.logs, args.name, 'out.log')
    if os.path.exists(log_path):
        raise StartRefused(f"experiment {os.path.join(args.logs, args.name)} already exists ({log_path}); use "
                           f"another --name, delete that folder, or continue it with --resume latest.")


def _check_data(args):
    """The data checks of the sample type's ``get_data`` (``registry.SampleType.check_data``), run before OpenCLIP
    creates the experiment folder (those that need the world size, e.g. "fewer rows than one batch", stay in
    ``get_data``)."""
    sample_type = getattr(args, 'csv_dataset_sample_type', 'default')
    if sample_type != 'default':
        registry.SAMPLE_TYPES[sample_type].check_data(args)


def _check_family_start(args):
    """The model family's own refusals of this config (e.g. a loss its model cannot train with)."""
    config = compat.read_model_config(args.model) or {}
    family = registry.family_for_config(config)
    if family is not None and family.start_check:
        registry.import_function(family.start_check)(args, config)


def check_training_start(args):
    """Every refusal ``open_clip_train.main`` would otherwise meet after creating ``logs/<name>``."""
    message = unknown_model_message(args.model)
    if message is not None:
        raise StartRefused(message)
    _check_pretrained(args)
    _check_resume(args)
    _check_new_experiment(args)
    _check_weights_fit(args)
    _check_family_start(args)  # the model's own refusals of these flags first, then the data
    _check_data(args)


def start_training_run(args):
    """The parse_args wrapper's last step: refuse a bad start (exit 2), else start the run (``run_state``)."""
    try:
        check_training_start(args)
    except ValueError as err:  # StartRefused, RankDataError, UnreadableCheckpointError: one line each
        refuse(str(err))
    args.rank_resume_latest = args.resume == 'latest'
    start_run(args)
    return args
