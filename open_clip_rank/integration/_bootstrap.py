"""Post-import hooks that let plugins extend OpenCLIP without editing it.

Standard library only: this module is imported by ``open_clip_rank.pth`` at interpreter start,
so it must stay cheap (no torch, no open_clip). It does three things:

* ``when_imported(name, callback)`` runs ``callback(module)`` right after ``name`` has been
  executed, before the importer gets the module back (or at once if it is already imported).
  That ordering matters: ``python -m open_clip_train.main`` binds ``from open_clip import
  create_loss`` while its own imports run, so OpenCLIP must be extended before that line completes.
  The callback gets the module that ends up in ``sys.modules`` (an alias loader swaps it in).
* ``autoload()`` (called from the ``.pth`` file) applies every ``open_clip.plugins`` entry point
  the first time ``open_clip``, ``open_clip_train`` or the legacy source-checkout ``training``
  package is imported. ``OPEN_CLIP_RANK_AUTOLOAD=0`` turns it off.
* ``autoload()`` also makes ``training`` an alias of ``open_clip_train``, so the original fork's
  commands (``torchrun -m training.main --model ...``) run the installed trainer. The alias is a
  fallback: a real ``training`` package anywhere on ``sys.path`` (a user's project, an OpenCLIP
  source checkout) still wins. ``import training.params`` gives the very module object
  ``open_clip_train.params`` (no copy, its ``__spec__``/``__name__`` untouched), so patches are shared.
  Two finders do it: one appended to ``sys.meta_path`` answers the top-level ``training`` only
  when no other finder has one; one near the front answers ``training.<sub>`` while ``training``
  is the alias, before ``PathFinder`` could load a second copy from ``open_clip_train.__path__``.
"""
import os
import sys
import threading

PLUGIN_GROUP = 'open_clip.plugins'
AUTOLOAD_ENV = 'OPEN_CLIP_RANK_AUTOLOAD'
# Importing any of these means OpenCLIP is about to be used: plugins must be applied first.
TRIGGER_MODULES = ('open_clip', 'open_clip_train', 'training')
# The source-checkout name of OpenCLIP's trainer, and the name it is installed under.
ALIAS_NAME, ALIAS_TARGET = 'training', 'open_clip_train'

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
        name = module.__name__
        # Put the real loader back first so introspection (inspect, pkgutil, runpy) sees it.
        module.__loader__ = self._loader
        if getattr(module, '__spec__', None) is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        # A loader may put another module under the name (the alias does): the importer gets that one.
        _fire(name, sys.modules.get(name, module))

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


# --- ``training`` -> ``open_clip_train`` alias -------------------------------------------------

def _target_name(fullname):
    """'training.main' -> 'open_clip_train.main'."""
    return ALIAS_TARGET + fullname[len(ALIAS_NAME):]


class _AliasLoader:
    """Imports the real module and puts that very object in ``sys.modules`` under the alias name.

    ``create_module`` returns None, so the import system makes a throwaway module; ``exec_module``
    then replaces it in ``sys.modules``, and the importer returns what is there (not the throwaway).
    Setting up the real module through ``create_module`` would not do: the import system would
    overwrite its ``__spec__`` with the alias spec.
    """

    def __init__(self, target_spec):
        self._target = target_spec

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        import importlib
        sys.modules[module.__name__] = importlib.import_module(self._target.name)

    # runpy (``python -m training.main``, torchrun -m) runs the real module's code under the alias name.
    def get_code(self, fullname):
        return self._target.loader.get_code(self._target.name)

    def get_source(self, fullname):
        return self._target.loader.get_source(self._target.name)

    def is_package(self, fullname):
        return self._target.submodule_search_locations is not None


def _alias_spec(fullname):
    """A spec for ``training[.sub]`` that loads ``open_clip_train[.sub]``; None if that does not exist."""
    from importlib.machinery import ModuleSpec
    from importlib.util import find_spec
    try:
        target = find_spec(_target_name(fullname))  # finds, does not execute (parents are imported)
    except (ImportError, ValueError):
        return None
    if target is None or target.loader is None:
        return None
    spec = ModuleSpec(fullname, _AliasLoader(target), origin=target.origin)
    spec.has_location = target.has_location  # so runpy sets __file__ and argv[0] to the real file
    if target.submodule_search_locations is not None:
        spec.submodule_search_locations = list(target.submodule_search_locations)
    return spec


def _alias_active():
    package = sys.modules.get(ALIAS_NAME)
    return package is not None and package is sys.modules.get(ALIAS_TARGET)


class _AliasSubmoduleFinder:
    """Near the front of sys.meta_path: ``training.<sub>`` while ``training`` is the alias.

    The alias shares ``open_clip_train.__path__``, so without this PathFinder would execute
    ``open_clip_train/params.py`` a second time as a new module ``training.params``.
    """

    def find_spec(self, fullname, path=None, target=None):
        if not fullname.startswith(ALIAS_NAME + '.') or not _alias_active():
            return None
        return _alias_spec(fullname)


class _AliasPackageFinder:
    """Last on sys.meta_path: the top-level ``training``, only when no other finder provides one."""

    _busy = threading.local()  # a delegating finder placed after us must not send us round in circles

    def find_spec(self, fullname, path=None, target=None):
        if fullname != ALIAS_NAME or getattr(self._busy, 'on', False):
            return None
        if self._found_by_later_finder(fullname, path, target):
            return None  # finders appended after ours (set up by later .pth files) still win
        return _alias_spec(fullname)

    def _found_by_later_finder(self, fullname, path, target):
        later = sys.meta_path[sys.meta_path.index(self) + 1:] if self in sys.meta_path else []
        self._busy.on = True
        try:
            return any(getattr(f, 'find_spec', None) and f.find_spec(fullname, path, target) for f in later)
        finally:
            self._busy.on = False


_submodule_finder = _AliasSubmoduleFinder()
_package_finder = _AliasPackageFinder()


def install_training_alias():
    """Make ``training`` (when nothing else provides it) an alias of ``open_clip_train``."""
    if _submodule_finder not in sys.meta_path:
        # Right after the post-import finder, which must still see (and wrap) alias specs.
        at = sys.meta_path.index(_finder) + 1 if _finder in sys.meta_path else 0
        sys.meta_path.insert(at, _submodule_finder)
    if _package_finder not in sys.meta_path:
        sys.meta_path.append(_package_finder)


def _is_openclip_checkout(module):
    """``training`` is a common name: only OpenCLIP's (src/training beside src/open_clip) counts."""
    for path in getattr(module, '__path__', None) or []:
        if os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(path)), 'open_clip')):
            return True
    return False


def load_plugins(module=None):
    """Apply every installed ``open_clip.plugins`` entry point once (each must be idempotent)."""
    global _plugins_loaded
    # The alias hands us open_clip_train itself (its __name__), so only a real ``training`` is checked.
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
    """Entry from the ``.pth`` file: apply plugins when OpenCLIP is first imported; alias ``training``."""
    if not autoload_enabled():
        return
    install_training_alias()
    for name in TRIGGER_MODULES:
        when_imported(name, load_plugins)
