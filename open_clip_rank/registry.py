"""The registry: the method families, losses and sample types the plugin brings to OpenCLIP.

Everything else in the package asks these tables and never names a family, a loss or a sample type:
the OpenCLIP hook (model classes, ``create_loss``, ``get_data``, ``evaluate``), the training flags and their
checks, the start checks, webdataset shards and ``make_shards``, the rank CLI and validation.

* A **family** is a model-config key (``adapter_cfg``, ``ordinal_cfg``): any OpenCLIP config carrying it
  builds the family's model classes (which follow the rank-model protocol, ``models/base.py``).
* A **loss** is a ``--loss-opt`` value: its builder, the sample type whose targets it trains on (None: plain
  image-caption data), and whether it forms pairs / needs the pair head.
* A **sample type** is a ``--csv-dataset-sample-type`` value, a task: its data builder, the checks of its
  data before a run starts, its validation metrics, its shard fields and ``make_shards`` records, and how
  the rank CLI reads, measures and reports it.

Each declares what it adds as ``'module:function'`` paths, imported on first use (``specs.py``: registration stays
cheap, no torch). The built-in ones are declared in ``builtin.py`` and registered when this module is imported; other packages register theirs from an entry
point of the ``open_clip_rank.plugins`` group (a function that calls ``register_*``, and ``register_config_dir`` for
its model configs), loaded once on first need (``load_plugins``).
``docs/DESIGN.md`` has the add-a-family / add-a-loss / add-a-sample-type checklists.
"""
import logging
import os
from pathlib import Path
from typing import Dict, List, Mapping, Optional

from . import builtin
from .specs import Hook, RankFamily, RankLoss, SampleType, import_function  # noqa: F401

_logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = 'open_clip_rank.plugins'
# Extra model-config folders (os.pathsep-separated) registered with OpenCLIP, e.g. for your own configs.
EXTRA_CONFIGS_ENV = 'OPEN_CLIP_RANK_MODEL_CONFIGS'

FAMILIES: Dict[str, RankFamily] = {}
LOSSES: Dict[str, RankLoss] = {}
SAMPLE_TYPES: Dict[str, SampleType] = {}
CONFIG_DIRS: List[Path] = []  # model-config folders of registered plugins (the shipped one comes first)


def register_config_dir(folder) -> Path:
    """A folder of model-config JSONs that OpenCLIP should know (a plugin's own ``*-<suffix>.json`` files)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"model-config folder {folder} does not exist.")
    if folder not in CONFIG_DIRS:
        CONFIG_DIRS.append(folder)
    return folder


def register_sample_type(sample_type: SampleType) -> SampleType:
    if sample_type.name == 'default':
        raise ValueError("'default' is OpenCLIP's own CSV data, not a plugin sample type.")
    SAMPLE_TYPES[sample_type.name] = sample_type
    return sample_type


def register_loss(loss: RankLoss) -> RankLoss:
    if loss.sample_type is not None and loss.sample_type not in SAMPLE_TYPES:
        raise ValueError(f"loss {loss.name!r} trains on unregistered sample type {loss.sample_type!r}; "
                         f"register_sample_type it first.")
    LOSSES[loss.name] = loss
    return loss


def register_family(family: RankFamily) -> RankFamily:
    unknown = [t for t in family.sample_types if t not in SAMPLE_TYPES]
    if unknown:
        raise ValueError(f"family {family.name!r} trains on unregistered sample type(s) {unknown}; "
                         f"register_sample_type them first.")
    if family.default_loss not in LOSSES:
        raise ValueError(f"family {family.name!r} defaults to unregistered loss {family.default_loss!r}; "
                         f"register_loss it first.")
    for other in FAMILIES.values():
        if other.name != family.name and family.config_key == other.config_key:
            raise ValueError(f"config key {family.config_key!r} already belongs to the {other.name} family.")
    FAMILIES[family.name] = family
    return family


_plugins_loaded = False


def load_plugins() -> None:
    """Register what other installed packages declare under the ``open_clip_rank.plugins`` entry point group.

    Once per process, on first need: when OpenCLIP is imported (the hook's ``register``), when a command builds its
    parser, at the first lookup. Not at this module's import, so a plugin's registration module can import it.
    """
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True  # before loading: a plugin whose import imports open_clip must not load them again
    import sys
    from importlib.metadata import entry_points
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        half_imported = entry.module in sys.modules  # its own import is what got us here
        try:
            entry.load()()
        except Exception as err:
            hint = (f" (its module {entry.module} was still being imported: an entry-point module must not import "
                    f"open_clip at import time; name the modules that do in its hooks)") if half_imported else ''
            raise RuntimeError(f"open_clip_rank plugin {entry.name!r} ({entry.value}) failed to register: "
                               f"{type(err).__name__}: {err}{hint}") from err
        _logger.debug(f"open_clip_rank plugin {entry.name} registered")


# --- lookups -----------------------------------------------------------------------------------------

def all_hooks(attribute: str):
    """Every registered sample type's, loss's and family's ``attribute`` hook that is set, each once, in that order
    (two losses may share one, e.g. the pair losses' flags)."""
    load_plugins()
    seen = set()
    for entry in (*SAMPLE_TYPES.values(), *LOSSES.values(), *FAMILIES.values()):
        hook = getattr(entry, attribute, None)
        if hook and hook not in seen:
            seen.add(hook)
            yield hook


def families_training_on(sample_type: str):
    """The families whose models train on ``sample_type`` (e.g. for a hint naming their model names)."""
    load_plugins()
    return [f for f in FAMILIES.values() if sample_type in f.sample_types]


def family_for_config(model_cfg: Optional[Mapping]) -> Optional[RankFamily]:
    """The family of a model config dict (None: a plain OpenCLIP config)."""
    load_plugins()
    found = [f for f in FAMILIES.values() if model_cfg and f.config_key in model_cfg]
    if len(found) > 1:
        raise ValueError(f"a model config may carry one of {[f.config_key for f in found]}, not several.")
    return found[0] if found else None


def family_for_model(model) -> Optional[RankFamily]:
    """The family of a built model (DDP-wrapped or not); None for plain OpenCLIP models."""
    load_plugins()
    from .models.base import RankModel, unwrap
    model = unwrap(model)
    return FAMILIES[model.family_name] if isinstance(model, RankModel) else None


def family_for_model_name(model_name: Optional[str]) -> Optional[RankFamily]:
    """The family a model name (built-in, ``local-dir:``, ``hf-hub:``) resolves to, from its config."""
    if not model_name:
        return None
    from .integration.compat import read_model_config
    return family_for_config(read_model_config(model_name))


def num_ranks_of_model_name(model_name: str) -> Optional[int]:
    """The number of ranks the model named ``model_name`` predicts (None: it scores by prompts)."""
    from .integration.compat import read_model_config
    config = read_model_config(model_name)
    family = family_for_config(config)
    return family.ranks_of(config) if family is not None else None


def resolved_loss(args) -> Optional[RankLoss]:
    """``--loss-opt``, or the model family's default for rank models; None for OpenCLIP's own losses."""
    load_plugins()
    name = getattr(args, 'loss_opt', None)
    if name is None:
        family = family_for_model_name(getattr(args, 'model', None))
        name = family.default_loss if family is not None else None
    return LOSSES.get(name) if name is not None else None


def sample_type_of_model(model) -> SampleType:
    """The sample type a built rank model's data has (its family's first): what the rank CLI reads."""
    return SAMPLE_TYPES[family_for_model(model).sample_types[0]]


def base_model_name(model_name: str) -> Optional[str]:
    """'convnext_large_d_320-adapter' -> 'convnext_large_d_320' (None if not a derived name)."""
    load_plugins()
    for family in FAMILIES.values():
        if model_name.endswith(family.suffix):
            base = model_name[:-len(family.suffix)]
            return family.base_aliases.get(base, base)
    return None


# --- shipped configs -------------------------------------------------------------------------------

def _find_config_dir() -> Path:
    """Installed wheels carry the configs inside the package; source and editable installs beside it."""
    here = Path(__file__).resolve().parent
    for candidate in (here / 'model_configs', here.parent / 'model_configs'):
        if candidate.is_dir() and any(candidate.glob('*.json')):
            return candidate
    raise RuntimeError(f"open_clip_rank model configs not found near {here}; reinstall the package.")


CONFIG_DIR = _find_config_dir()


def plugin_config_names():
    return sorted(p.stem for p in CONFIG_DIR.glob('*.json'))


def config_dirs():
    """The shipped folder, the registered plugins' folders, then the folders named by OPEN_CLIP_RANK_MODEL_CONFIGS."""
    load_plugins()
    extra = [Path(p) for p in os.environ.get(EXTRA_CONFIGS_ENV, '').split(os.pathsep) if p]
    for folder in extra:
        if not folder.exists():
            raise RuntimeError(f"{EXTRA_CONFIGS_ENV} names {folder}, which does not exist.")
    return [CONFIG_DIR, *CONFIG_DIRS, *extra]



def _register_builtin():
    for sample_type in builtin.SAMPLE_TYPES:
        register_sample_type(sample_type)
    for loss in builtin.LOSSES:
        register_loss(loss)
    for family in builtin.FAMILIES:
        register_family(family)


_register_builtin()
