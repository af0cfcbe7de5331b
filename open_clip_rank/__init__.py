"""open_clip_rank: text-driven image ranking for OpenCLIP, as a plugin.

Importing this package is cheap (no torch): it arranges for ``register()`` to run as soon as
``open_clip`` is imported, or right away if it already is. After that, OpenCLIP itself knows the
plugin's models (``open_clip.create_model('convnext_large_d_320-adapter')``) and training flags.
"""
from .integration import _bootstrap
from .version import __version__

_LAZY = {
    'register': 'integration.hook',
    # the registry: what a third-party family, loss or sample type registers with
    'FAMILIES': 'registry',
    'LOSSES': 'registry',
    'SAMPLE_TYPES': 'registry',
    'RankFamily': 'registry',
    'RankLoss': 'registry',
    'SampleType': 'registry',
    'register_family': 'registry',
    'register_loss': 'registry',
    'register_sample_type': 'registry',
    'register_config_dir': 'registry',
    'family_for_model': 'registry',
    # the rank-model protocol and the library API
    'RankModel': 'models.base',
    'RankTexts': 'data.batches',
    'load_rank_model': 'inference',
    'rank_images': 'inference',
    'CheckpointMismatchError': 'models.checkpoint',
    # the adapter family's classes (the paper's model)
    'AdapterCfg': 'models.adapter_layers',
    'RankAdapter': 'models.adapter_layers',
    'RankAdapterCLIP': 'models.adapter',
    'RankAdapterCustomTextCLIP': 'models.adapter',
}

__all__ = ['__version__', *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f'.{_LAZY[name]}', __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _register_now(_module=None):
    from .integration.hook import register
    register()


_bootstrap.when_imported('open_clip', _register_now)
