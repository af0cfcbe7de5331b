"""Post-import hooks that let plugins extend OpenCLIP without editing it.

Standard library only: this module is imported by ``open_clip_rank.pth`` at interpreter start,
so it must stay cheap (no torch, no open_clip). It does two things:

* ``when_imported(name, callback)`` runs ``callback(module)`` right after ``name`` has been
  executed, before the importer gets the module back (or at once if it is already imported).
  That ordering matters: ``python -m open_clip_train.main`` binds ``from open_clip import
  create_loss`` while its own imports run, so OpenCLIP must be extended before that line completes.
* ``autoload()`` (called from the ``.pth`` file) applies every ``open_clip.plugins`` entry point
  the first time ``open_clip``, ``open_clip_train`` or the legacy source-checkout ``training``
  package is imported. ``OPEN_CLIP_RANK_AUTOLOAD=0`` turns it off.
"""
import os
import sys
import threading

PLUGIN_GROUP = 'open_clip.plugins'
AUTOLOAD_ENV = 'OPEN_CLIP_RANK_AUTOLOAD'
# Importing any of these means OpenCLIP is about to be used: plugins must be applied first.
TRIGGER_MODULES = ('open_clip', 'open_clip_train', 'training')

_callbacks = {}  # module name -> list of callbacks still to run
_lock = threading.RLock()
_plugins_loaded = False


def autoload_enabled():
    return os.environ.get(AUTOLOAD_ENV, '1').strip().lower() not in ('0', 'false', 'no', 'off')


class _RunCallbacksLoader:
    """Wraps a module's real loader; after the module body has run, fires its callbacks."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        # Put the real loader back first so introspection (inspect, pkgutil, runpy) sees it.
        module.__loader__ = self._loader
        if getattr(module, '__spec__', None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _fire(module.__name__, module)

    def __getattr__(self, name):
        # get_code, get_source, is_package, get_resource_reader ... go to the real loader
        return getattr(self._loader, name)


class _PostImportFinder:
    """First on sys.meta_path; only intercepts modules that have callbacks waiting."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _callbacks:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, 'find_spec'):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, 'exec_module'):
                    spec.loader = _RunCallbacksLoader(spec.loader)
                return spec
        return None


_finder = _PostImportFinder()


def _install_finder():
    if _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)


def _fire(name, module):
    with _lock:
        callbacks = _callbacks.pop(name, [])
    for callback in callbacks:
        callback(module)


def when_imported(name, callback):
    """Run ``callback(module)`` once ``name`` is imported (immediately if it already is)."""
    with _lock:
        module = sys.modules.get(name)
        if module is None:
            _callbacks.setdefault(name, []).append(callback)
            _install_finder()
            return
    callback(module)


def _is_openclip_checkout(module):
    """``training`` is a common name: only OpenCLIP's (src/training beside src/open_clip) counts."""
    for path in getattr(module, '__path__', None) or []:
        if os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(path)), 'open_clip')):
            return True
    return False


def load_plugins(module=None):
    """Apply every installed ``open_clip.plugins`` entry point once (each must be idempotent)."""
    global _plugins_loaded
    if module is not None and module.__name__ == 'training' and not _is_openclip_checkout(module):
        return
    with _lock:
        if _plugins_loaded:
            return
        _plugins_loaded = True
    from importlib.metadata import entry_points
    for entry_point in entry_points(group=PLUGIN_GROUP):
        entry_point.load()()


def autoload():
    """Entry from the ``.pth`` file: apply plugins when OpenCLIP is first imported."""
    if not autoload_enabled():
        return
    for name in TRIGGER_MODULES:
        when_imported(name, load_plugins)
