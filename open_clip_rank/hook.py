"""Every touch on OpenCLIP lives here.

``register()`` is idempotent. Each extension is a thin dispatch: it handles what the plugin owns
(configs with ``adapter_cfg``, rank-adapter models, the plugin's flags) and hands everything else
to OpenCLIP's original function unchanged, so plain OpenCLIP models behave exactly as before.

What is extended:
* model configs: ``model_configs/*.json`` via ``open_clip.add_model_config``;
* model construction: ``open_clip.factory`` picks ``CLIP``/``CustomTextCLIP`` by name at call time;
  those names are replaced by dispatchers that build the adapter classes for configs carrying
  ``adapter_cfg`` (built-in, ``local-dir:`` and ``hf-hub:`` configs alike);
* weights: ``load_checkpoint`` dispatches rank-adapter models to ``checkpoint.load_rank_checkpoint``;
* pretrained tags: ``<base>-adapter`` gets the pretrained entries of ``<base>``;
* ``create_loss``: a ``RankingLoss`` for ``--loss-opt`` (and by default for adapter models);
* the training CLI (``open_clip_train.*`` and the source-checkout ``training.*``), patched when those
  modules are first imported: ``parse_args`` gains the plugin's flags, ``get_data`` builds rank data for
  ``--csv-dataset-sample-type rank``, ``evaluate`` reports ranking metrics for rank validation data, and
  ``init_distributed_device`` lets CPU (gloo) runs wrap the model in DDP.
"""
import copy
import functools
import json
import logging
import os
import sys
import threading
from pathlib import Path

from . import _bootstrap

_logger = logging.getLogger(__name__)


def _find_config_dir() -> Path:
    """Installed wheels carry the configs inside the package; source and editable installs beside it."""
    here = Path(__file__).resolve().parent
    for candidate in (here / 'model_configs', here.parent / 'model_configs'):
        if candidate.is_dir() and any(candidate.glob('*.json')):
            return candidate
    raise RuntimeError(f"open_clip_rank model configs not found near {here}; reinstall the package.")


CONFIG_DIR = _find_config_dir()
DERIVED_SUFFIXES = ('-adapter',)
# Derived configs whose base is not simply the name without the suffix.
BASE_MODEL_ALIASES = {
    'convnext_base_w_224': 'convnext_base_w',  # same towers as convnext_base_w, 224 px
    'ViT-B-16-plus': 'ViT-B-16-plus-240',  # ViT-B-16-plus has no weights; -240 does (pos-embed is resized)
}
TRAINING_PACKAGES = ('open_clip_train', 'training')
TRAINING_MODULES = ('params', 'data', 'train', 'distributed')
# Extra model-config folders (os.pathsep-separated) registered with OpenCLIP, e.g. for your own configs.
EXTRA_CONFIGS_ENV = 'OPEN_CLIP_RANK_MODEL_CONFIGS'

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
    from open_clip import factory
    _register_model_configs(open_clip)
    _patch_factory(open_clip, factory)
    register_derived_pretrained()
    for package in TRAINING_PACKAGES:
        for module in TRAINING_MODULES:
            _bootstrap.when_imported(f'{package}.{module}', _patch_training_module)
    _logger.debug('open_clip_rank registered with OpenCLIP')


def _register_model_configs(open_clip):
    open_clip.add_model_config(CONFIG_DIR)
    for folder in filter(None, os.environ.get(EXTRA_CONFIGS_ENV, '').split(os.pathsep)):
        if not Path(folder).exists():
            raise RuntimeError(f"{EXTRA_CONFIGS_ENV} names {folder}, which does not exist.")
        open_clip.add_model_config(folder)


def plugin_config_names():
    return sorted(p.stem for p in CONFIG_DIR.glob('*.json'))


def _original(fn):
    return getattr(fn, '__wrapped__', fn)


def _model_class_dispatch(original, adapter_class):
    """Stands in for ``CLIP`` / ``CustomTextCLIP`` inside ``open_clip.factory.create_model``."""

    @functools.wraps(original, updated=())
    def build(*args, **model_cfg):
        if 'adapter_cfg' in model_cfg:
            return adapter_class(*args, **model_cfg)
        return original(*args, **model_cfg)

    return build


def _patch_factory(open_clip, factory):
    from .checkpoint import load_rank_checkpoint
    from .model import RankAdapterCLIP, RankAdapterCustomTextCLIP, is_rank_adapter

    for name in ('CLIP', 'CustomTextCLIP', 'load_checkpoint', 'create_loss'):
        if not hasattr(factory, name):
            raise RuntimeError(
                f"open_clip.factory.{name} is missing: this OpenCLIP version ({open_clip.__version__}) is not "
                f"supported by open_clip_rank; install open_clip_torch 3.3.x.")
    factory.CLIP = _model_class_dispatch(_original(factory.CLIP), RankAdapterCLIP)
    factory.CustomTextCLIP = _model_class_dispatch(_original(factory.CustomTextCLIP), RankAdapterCustomTextCLIP)

    original_load = _original(factory.load_checkpoint)

    @functools.wraps(original_load)
    def load_checkpoint(model, checkpoint_path, strict=True, weights_only=True, device='cpu'):
        if is_rank_adapter(model):
            return load_rank_checkpoint(model, checkpoint_path, strict=strict, weights_only=weights_only, device=device)
        return original_load(model, checkpoint_path, strict=strict, weights_only=weights_only, device=device)

    factory.load_checkpoint = load_checkpoint
    open_clip.load_checkpoint = load_checkpoint

    original_create_loss = _original(factory.create_loss)

    @functools.wraps(original_create_loss)
    def create_loss(args):
        loss = create_rank_loss(args)
        return loss if loss is not None else original_create_loss(args)

    factory.create_loss = create_loss
    open_clip.create_loss = create_loss


def is_rank_model_name(model_name: str) -> bool:
    """Does this model name (built-in, local-dir: or hf-hub:) resolve to a config with adapter_cfg?"""
    import open_clip
    from open_clip.factory import parse_model_name
    schema, identifier = parse_model_name(model_name)
    try:
        if schema is None:
            cfg = open_clip.get_model_config(identifier.replace('/', '-')) or {}
        elif schema == 'local-dir':
            cfg = json.loads((Path(identifier) / 'open_clip_config.json').read_text()).get('model_cfg', {})
        else:
            cfg = open_clip.factory._get_hf_config(identifier).get('model_cfg', {})
    except Exception:  # unreadable config: let OpenCLIP report it when it builds the model
        return False
    return 'adapter_cfg' in cfg


def resolved_loss_opt(args):
    """``--loss-opt``, defaulting to single-head for adapter models (as the original); None otherwise."""
    loss_opt = getattr(args, 'loss_opt', None)
    if loss_opt is None and getattr(args, 'model', None) and is_rank_model_name(args.model):
        loss_opt = 'single-head'
    return loss_opt


def create_rank_loss(args):
    """RankingLoss for rank training; None hands loss creation back to OpenCLIP."""
    from .losses import RankingLoss
    loss_opt = resolved_loss_opt(args)
    if loss_opt not in ('dual-head', 'single-head'):
        return None
    weights = {'rank': args.rank_loss_weight, 'regression': args.regression_loss_weight, 'bce': args.bce_loss_weight}
    return RankingLoss(head=loss_opt.split('-')[0], components=args.loss_components, weights=weights,
                       ignore_ties=args.pair_loss_ignore_ties, micro_batch_size=args.batch_size)


def base_model_name(model_name: str):
    """'convnext_large_d_320-adapter' -> 'convnext_large_d_320' (None if not a derived name)."""
    for suffix in DERIVED_SUFFIXES:
        if model_name.endswith(suffix):
            base = model_name[:-len(suffix)]
            return BASE_MODEL_ALIASES.get(base, base)
    return None


def register_derived_pretrained():
    """``<base>-adapter`` + a tag of ``<base>`` loads the base weights (adapter starts fresh).

    Covers every known derived config, including ones added later with ``add_model_config``
    (call again after adding them).
    """
    import open_clip
    from open_clip import pretrained
    registry = pretrained._PRETRAINED
    for name in open_clip.list_models():
        base = base_model_name(name)
        if base in registry and name not in registry:
            registry[name] = registry[base]  # shared, so later additions to the base show up too


def _is_ours(fn):
    return getattr(fn, '_open_clip_rank', False)


def _from_openclip_checkout(module):
    """``training.*`` only counts when it is OpenCLIP's source-checkout package."""
    return not module.__name__.startswith('training.') or _bootstrap._is_openclip_checkout(sys.modules['training'])


def _replace(module, name, make_wrapper):
    """``module.name = make_wrapper(original)``: once, and only in OpenCLIP's own training package."""
    original = getattr(module, name)
    if _is_ours(original) or not _from_openclip_checkout(module):
        return
    wrapper = functools.wraps(original)(make_wrapper(original))
    wrapper._open_clip_rank = True
    setattr(module, name, wrapper)


def uses_rank_data(args) -> bool:
    return getattr(args, 'csv_dataset_sample_type', 'default') == 'rank'


def _rank_get_data(original):
    def get_data(args, preprocess_fns, epoch=0, tokenizer=None):
        if not uses_rank_data(args):
            return original(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)
        from .data import RankDataError, get_rank_data
        try:
            if not is_rank_model_name(args.model):
                raise RankDataError(f"--csv-dataset-sample-type rank trains ranking models, but --model {args.model} "
                                    f"has no adapter_cfg; use a *-adapter model (open_clip.list_models()).")
            with_pairs = resolved_loss_opt(args) != 'single-head'
            data = get_rank_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer, with_pairs=with_pairs)
        except RankDataError as err:  # one clear line, before any training starts
            _logger.error(str(err))
            raise SystemExit(f"open_clip_rank: error: {err}")
        if args.imagenet_val is not None or args.imagenet_v2 is not None:
            data.update({k: v for k, v in original(_without_csv(args), preprocess_fns, epoch, tokenizer).items()
                         if k.startswith('imagenet')})
        return data

    return get_data


def _without_csv(args):
    args = copy.copy(args)
    args.train_data = args.val_data = None
    return args


def _rank_evaluate(original):
    def evaluate(model, data, epoch, args, tb_writer=None, tokenizer=None):
        if not getattr(data.get('val'), 'rank_eval', False):
            return original(model, data, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer)
        from .evaluate import evaluate_ranking
        metrics = evaluate_ranking(model, data, epoch, args, tb_writer=tb_writer)
        others = {k: v for k, v in data.items() if k != 'val'}
        if any(k.startswith('imagenet') for k in others):
            metrics.update(original(model, others, epoch, args, tb_writer=tb_writer, tokenizer=tokenizer))
        return metrics

    return evaluate


def _cpu_ddp_init_distributed_device(original):
    """CPU torchrun: OpenCLIP 3.3's main wraps the model as ``DistributedDataParallel(model,
    device_ids=[device])``, which torch rejects for CPU modules. Once a CPU process group is up,
    DDP is given a subclass that drops ``device_ids`` for CPU modules, the one case that would raise."""
    def init_distributed_device(args):
        device = original(args)
        if args.distributed and device.type == 'cpu':
            _allow_cpu_ddp_device_ids()
        return device

    return init_distributed_device


def _allow_cpu_ddp_device_ids():
    import torch
    ddp = torch.nn.parallel.DistributedDataParallel
    if getattr(ddp, '_open_clip_rank', False):
        return

    class DistributedDataParallel(ddp):
        _open_clip_rank = True

        def __init__(self, module, device_ids=None, *args, **kwargs):
            if device_ids and all(torch.device(d).type == 'cpu' for d in device_ids):
                device_ids = None
            super().__init__(module, device_ids, *args, **kwargs)

    torch.nn.parallel.DistributedDataParallel = DistributedDataParallel


def _patch_training_module(module):
    from .params import wrap_parse_args
    short = module.__name__.split('.', 1)[1]
    name, make_wrapper = {'params': ('parse_args', wrap_parse_args), 'data': ('get_data', _rank_get_data),
                          'train': ('evaluate', _rank_evaluate),
                          'distributed': ('init_distributed_device', _cpu_ddp_init_distributed_device)}[short]
    _replace(module, name, make_wrapper)
