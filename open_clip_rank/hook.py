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
* the training CLI (``open_clip_train.*`` and the source-checkout ``training.*``): ``parse_args``
  gains the plugin's flags, patched when those modules are first imported.
"""
import functools
import logging
import threading
from pathlib import Path

from . import _bootstrap



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
        _bootstrap.when_imported(f'{package}.params', _patch_params)
    logging.debug('open_clip_rank registered with OpenCLIP')


def _register_model_configs(open_clip):
    open_clip.add_model_config(CONFIG_DIR)


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

    for name in ('CLIP', 'CustomTextCLIP', 'load_checkpoint', 'create_model'):
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


def _patch_params(module):
    from .params import wrap_parse_args
    if getattr(module.parse_args, '_open_clip_rank', False):
        return
    if module.__name__.startswith('training.') and not _bootstrap._is_openclip_checkout(
            __import__('sys').modules['training']):
        return
    module.parse_args = wrap_parse_args(module.parse_args)
