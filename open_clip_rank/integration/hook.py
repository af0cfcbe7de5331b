"""The patches that teach OpenCLIP the plugin: mechanics only, each a thin dispatch.

``register()`` is idempotent. Each patched function handles what the plugin owns and hands
everything else to OpenCLIP's original unchanged, so plain OpenCLIP models behave exactly as before.
*What* the plugin owns is decided elsewhere: families, losses and sample types in ``registry.py`` (which this
module asks, never naming one), flags in ``flags.py``. Every patch point is checked in ``compat.py``,
which fails loudly when OpenCLIP has moved one.

Patched:
* ``open_clip.factory.CLIP`` / ``CustomTextCLIP`` (looked up by ``create_model`` at call time): configs
  carrying a family key build that family's classes (built-in, ``local-dir:`` and ``hf-hub:`` alike);
* ``open_clip.load_checkpoint``: verifies the file first (``files/integrity.py``) and names it in load errors;
* ``open_clip.create_loss``: the plugin's losses (``--loss-opt``, or a rank family's default);
* OpenCLIP's pretrained table: ``<base>-adapter`` gets the pretrained tags of ``<base>``;
* the training package (``open_clip_train.*``, and ``training.*`` of an OpenCLIP source checkout),
  when first imported: ``parse_args`` (the plugin's flags), ``get_data`` (the families' sample types),
  ``evaluate`` (ranking metrics for rank validation data; then ``--rank-save-best``'s ``epoch_best.pt``,
  ``save_best.py``), ``train_one_epoch`` (tells a loss with
  ``start_epoch`` the epoch: RankCLIP's ramp; applies the optimiser options of ``optimizer.py`` before the first
  step and wraps the schedule), ``init_distributed_device`` (CPU DDP), ``setup_logging``
  (torch's internal loggers stay at WARNING), ``pt_load`` (``--resume latest`` skips unreadable
  checkpoints), and ``zero_shot.accuracy`` where NumPy >= 2.4 breaks it (an upstream bug, fixed in
  ``compat``; CLIP_benchmark's ``accuracy`` too, when ``clip_benchmark`` is imported);
* ``parse_args`` also refuses a bad start before OpenCLIP creates ``logs/<name>`` (``start_checks``), starts the
  run (``run_state``) and makes the run's checkpoint writes atomic and checksummed (``torch.save`` into its
  checkpoint folder, ``files/atomic.py``, ``files/integrity.py``); and ``get_latest_checkpoint`` of the running
  ``main`` (``--resume latest``) no longer takes ``epoch_best.pt`` for the newest.
"""
import copy
import logging
import sys
import threading

from .. import registry
from . import _bootstrap, compat

_logger = logging.getLogger(__name__)

TRAINING_PACKAGES = ('open_clip_train', 'training')

_lock = threading.Lock()
_registered = False


def register():
    """Teach OpenCLIP the plugin's models (and training flags). Safe to call any number of times."""
    global _registered
    with _lock:
        if _registered:
            return
        _registered = True
    import open_clip
    compat.check_factory(open_clip)
    compat.check_version(open_clip)
    registry.load_plugins()  # other packages' families, losses and sample types
    for folder in registry.config_dirs():
        open_clip.add_model_config(folder)
    _patch_factory(open_clip)
    register_derived_pretrained()
    for package in TRAINING_PACKAGES:
        for module in compat.TRAINING_PATCH_POINTS:
            _bootstrap.when_imported(f'{package}.{module}', _patch_training_module)
        _bootstrap.when_imported(f'{package}.zero_shot', _fix_zero_shot)
        _bootstrap.when_imported(f'{package}.{compat.EPOCH_PATCH_POINT[0]}', _patch_train_one_epoch)
    for name in compat.CLIP_BENCHMARK_ACCURACY_MODULES:  # `clip_benchmark eval` (CLIP_benchmark)
        _bootstrap.when_imported(name, _fix_clip_benchmark)
    _logger.debug('open_clip_rank registered with OpenCLIP')


def _original(fn):
    return getattr(fn, '__wrapped__', fn)


# --- open_clip ---------------------------------------------------------------------------------------

def _model_class_dispatch(original, custom_text: bool):
    """Stands in for ``CLIP`` / ``CustomTextCLIP`` inside ``open_clip.factory.create_model``."""

    @compat.wraps_once(original)
    def build(*args, **model_cfg):
        family = registry.family_for_config(model_cfg)
        if family is None:
            return original(*args, **model_cfg)
        return family.model_class(custom_text)(*args, **model_cfg)

    return build


def _patch_factory(open_clip):
    from open_clip import factory
    factory.CLIP = _model_class_dispatch(_original(factory.CLIP), custom_text=False)
    factory.CustomTextCLIP = _model_class_dispatch(_original(factory.CustomTextCLIP), custom_text=True)
    original_load = _original(factory.load_checkpoint)

    @compat.wraps_once(original_load)
    def load_checkpoint(model, checkpoint_path, strict=True, weights_only=True, device='cpu'):
        from ..files.checkpoints import check_readable, note_loaded, reading_checkpoint
        from ..models.checkpoint import explaining_mismatch, load_rank_checkpoint
        check_readable(checkpoint_path)  # verified first: a flipped bit loads without any error from torch
        with reading_checkpoint(checkpoint_path):  # a damaged file torch trips on: one line naming it and the fix
            if registry.family_for_model(model) is None:
                with explaining_mismatch(model, checkpoint_path, weights_only=weights_only, device=device):
                    return original_load(model, checkpoint_path, strict=strict, weights_only=weights_only,
                                         device=device)
            result = load_rank_checkpoint(original_load, model, checkpoint_path, strict=strict,
                                          weights_only=weights_only, device=device)
            # load_rank_model refuses rank models whose own parameters hold no trained weights
            note_loaded(model, checkpoint_path, complete=getattr(result, 'full_checkpoint', True))
            return result

    original_create_loss = _original(factory.create_loss)

    @compat.wraps_once(original_create_loss)
    def create_loss(args):
        from ..losses import create_loss as create_plugin_loss
        loss = create_plugin_loss(args)
        return loss if loss is not None else original_create_loss(args)

    factory.load_checkpoint = open_clip.load_checkpoint = load_checkpoint
    factory.create_loss = open_clip.create_loss = create_loss


def register_derived_pretrained():
    """``<base>-adapter`` + a tag of ``<base>`` loads the base weights (the family's parts start fresh).

    Covers every known derived config, including ones added later with ``add_model_config``
    (call again after adding them).
    """
    import open_clip
    table = compat.pretrained_registry()
    for name in open_clip.list_models():
        base = registry.base_model_name(name)
        if base in table and name not in table:
            table[name] = table[base]  # shared, so later additions to the base show up too


# --- the training package ----------------------------------------------------------------------------

def _from_openclip_checkout(module):
    """``training.*`` only counts when it is OpenCLIP's source-checkout package."""
    return not module.__name__.startswith('training.') or _bootstrap._is_openclip_checkout(sys.modules['training'])


def _wrap_patch_point(module, find_name, make_wrapper):
    """Wrap one patch point of a training module, once (the ``training`` alias shares ``open_clip_train``'s
    modules); ``find_name(module, version)`` is compat's check, ``make_wrapper(name, original)`` the dispatch."""
    if not _from_openclip_checkout(module):
        return
    import open_clip
    name = find_name(module, open_clip.__version__)
    original = getattr(module, name)
    if compat.is_patched(original):
        return
    compat.check_training_package(module.__name__.rsplit('.', 1)[0], open_clip.__version__)
    setattr(module, name, compat.wraps_once(original)(make_wrapper(name, original)))


def _patch_training_module(module):
    wrappers = {'parse_args': _parse_args, 'get_data': _get_data, 'evaluate': _evaluate,
                'init_distributed_device': _init_distributed_device, 'setup_logging': _setup_logging,
                'pt_load': _pt_load}
    _wrap_patch_point(module, compat.training_patch_point, lambda name, original: wrappers[name](original))


def _patch_train_one_epoch(module):
    _wrap_patch_point(module, compat.epoch_patch_point, lambda name, original: _train_one_epoch(original))


def _train_one_epoch(original):
    """Losses with ``start_epoch`` learn OpenCLIP's (0-based) epoch before each ``train_one_epoch``, and the optimiser
    options (``optimizer.py``) adjust OpenCLIP's optimiser and schedule; after it, the registered ``after_epoch``
    hooks run (e.g. the adapter's feature cache logs the epoch's use)."""
    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        from .optimizer import configure_optimizer, wrap_scheduler
        from .run_state import current_run, write_run_model_config
        steps = getattr(data['train'].dataloader, 'num_batches', 0) // args.accum_freq
        start_epoch = getattr(loss, 'start_epoch', None)
        if callable(start_epoch):
            start_epoch(epoch, args, tb_writer=tb_writer, step=steps * epoch)
        configure_optimizer(optimizer, args, model)  # --param-group-lr, --amsgrad: before the first step
        if current_run() is not None:
            current_run().note_optimizer(optimizer)
            current_run().note_scaler(scaler)
            write_run_model_config(args)  # logs/<name>/config.json, for the rank CLI's --config-path
        scheduler = wrap_scheduler(scheduler, optimizer, args, steps)  # group rates, --lr-scheduler multistep
        result = original(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                          tb_writer=tb_writer)
        for hook in registry.all_hooks('after_epoch'):
            registry.import_function(hook)(args, epoch)
        return result

    return train_one_epoch


def _fix_zero_shot(module):
    """OpenCLIP 3.3's zero-shot top-k count fails under NumPy >= 2.4 (for every model): fixed in compat."""
    if _from_openclip_checkout(module) and compat.fix_zero_shot_accuracy(module):
        _logger.debug(f"{module.__name__}.accuracy replaced by a NumPy-2.4-safe equivalent")


def _fix_clip_benchmark(module):
    """CLIP_benchmark's top-k accuracy fails the same way under NumPy >= 2.4: fixed in compat."""
    if compat.fix_clip_benchmark_accuracy(module):
        _logger.debug(f"{module.__name__}.accuracy replaced by a NumPy-2.4-safe equivalent")


def _parse_args(original):
    from .flags import wrap_parse_args
    parse_plugin_args = wrap_parse_args(original)

    def parse_args(args):
        from .start_checks import start_training_run
        parsed = start_training_run(parse_plugin_args(args))  # refusals exit 2, before logs/<name> exists
        compat.patch_torch_save(_save_run_checkpoint)
        compat.patch_training_main(TRAINING_PACKAGES, 'get_latest_checkpoint', _latest_checkpoint)
        return parsed

    return parse_args


def _save_run_checkpoint(original_save, obj, f, *args, **kwargs):
    """torch.save: atomic and with a checksum for files in the current training run's checkpoint folder,
    unchanged otherwise."""
    from ..files.atomic import atomic_torch_save
    from ..files.checkpoints import inside
    from ..files.integrity import add_checksum
    from .run_state import run_flag
    folder = run_flag('checkpoint_path', None)
    if inside(folder, f):  # every loader verifies the checksum (files/integrity.py)
        return atomic_torch_save(original_save, add_checksum(_openclip_layout(obj)), f, *args, **kwargs)
    return original_save(obj, f, *args, **kwargs)


def _openclip_layout(checkpoint):
    """The optimiser of a run checkpoint in the groups OpenCLIP's ``main`` builds, so ``--resume`` can load it."""
    from .optimizer import state_dict_in_openclip_layout
    from .run_state import current_run
    optimizer = current_run().optimizer() if current_run() is not None else None
    if not isinstance(checkpoint, dict) or 'optimizer' not in checkpoint or optimizer is None:
        return checkpoint
    layout = state_dict_in_openclip_layout(optimizer)
    return checkpoint if layout is None else {**checkpoint, 'optimizer': layout}


def _setup_logging(original):
    def setup_logging(*args, **kwargs):
        result = original(*args, **kwargs)
        compat.quiet_torch_loggers()
        return result

    return setup_logging


def _pt_load(original):
    def pt_load(file_path, map_location=None):
        from ..files.checkpoints import load_resume_checkpoint
        from .run_state import current_run
        run = current_run()
        return load_resume_checkpoint(original, file_path, map_location=map_location,
                                      run_args=run.args if run is not None else None)

    return pt_load


def _get_data(original):
    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        sample_type = getattr(args, 'csv_dataset_sample_type', 'default')
        if sample_type == 'default':  # OpenCLIP's image-caption data, as the loss wants it (e.g. two views)
            loss = registry.resolved_loss(args)
            if loss is not None and loss.default_data:
                return registry.import_function(loss.default_data)(args, original, preprocess_fns, epoch=epoch,
                                                                   tokenizer=tokenizer)
            return original(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        from ..data import RankDataError
        from ..registry import SAMPLE_TYPES
        try:
            data = SAMPLE_TYPES[sample_type].get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        except RankDataError as err:  # one clear line, before any training starts
            _logger.error(str(err))
            raise SystemExit(f"open_clip_rank: error: {err}")
        if args.imagenet_val is not None or args.imagenet_v2 is not None:  # OpenCLIP builds those
            without_csv = copy.copy(args)
            without_csv.train_data = without_csv.val_data = None
            data.update(original(without_csv, preprocess_fns, epoch=epoch, tokenizer=tokenizer))
        return data

    return get_data


def _evaluate(original):
    def evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None):
        from .save_best import keep_best
        metrics = _evaluate_once(original, model, data, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer)
        keep_best(model, metrics, epoch, args, save=_save_into_run)  # --rank-save-best: epoch_best.pt
        return metrics

    return evaluate


def _evaluate_once(original, model, data, epoch, args, tb_writer=None, tokenizer=None):
    from ..data.loaders import RankDataInfo
    if not isinstance(data.get('val'), RankDataInfo):
        return original(model, data, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer)
    from ..evaluation.validation import evaluate_ranking
    others = {k: v for k, v in data.items() if k not in ('train', 'val')}  # zero-shot: OpenCLIP evaluates it,
    quiet = copy.copy(args)  # the plugin reports it with the ranking metrics (one results.jsonl record)
    quiet.save_logs = quiet.wandb = False
    other_metrics = original(model, others, epoch, quiet, tokenizer=tokenizer) if others else {}
    other_metrics.pop('epoch', None)
    return evaluate_ranking(model, data, epoch, args, tb_writer=tb_writer, other_metrics=other_metrics)


def _save_into_run(obj, path):
    """``torch.save(obj, path)`` into the run's checkpoint folder as OpenCLIP's own checkpoints are written (the
    route of ``_save_run_checkpoint``: atomic, checksummed), whether or not ``torch.save`` is patched yet."""
    import torch
    return _save_run_checkpoint(getattr(torch.save, '__wrapped__', torch.save), obj, path)


def _latest_checkpoint(original, module):
    """``--resume latest``'s search (``get_latest_checkpoint`` of OpenCLIP's main ``module``) without
    ``epoch_best.pt``, which its natural sort puts after every ``epoch_N.pt``."""
    def get_latest_checkpoint(path, remote):
        from ..files.best_checkpoint import BEST_CHECKPOINT_NAME, is_best_checkpoint
        from ..files.checkpoints import latest_regular_checkpoint
        latest = original(path, remote)
        if latest is None or not is_best_checkpoint(latest):
            return latest
        if remote:  # OpenCLIP lists the remote itself: no other listing to choose from
            raise SystemExit(f"open_clip_rank: error: --resume latest found {latest} newest on the remote, which is "
                             f"the best checkpoint (--rank-save-best), not the newest: resume with --resume "
                             f"<remote>/epoch_N.pt.")
        found = latest_regular_checkpoint(path)
        if found is None:
            _logger.warning(f"--resume latest: {path} holds only {BEST_CHECKPOINT_NAME}, the best checkpoint, not the "
                            f"newest: not resumed from it (--resume {latest} would).")
        return found

    return get_latest_checkpoint


def _init_distributed_device(original):
    def init_distributed_device(args):
        device = original(args)
        if args.distributed and device.type == 'cpu':
            compat.allow_cpu_ddp_device_ids()
        return device

    return init_distributed_device
