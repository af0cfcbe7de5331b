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

Each declares what it adds as ``'module:function'`` paths, imported on first use (registration stays cheap:
no torch). The built-in ones are registered in ``builtin.py``; other packages register theirs from an entry
point of the ``open_clip_rank.plugins`` group (a function that calls ``register_*``), loaded with the tables.
``docs/DESIGN.md`` has the add-a-family / add-a-loss / add-a-sample-type checklists.
"""
import importlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

_logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = 'open_clip_rank.plugins'
# Extra model-config folders (os.pathsep-separated) registered with OpenCLIP, e.g. for your own configs.
EXTRA_CONFIGS_ENV = 'OPEN_CLIP_RANK_MODEL_CONFIGS'

Hook = Optional[str]  # 'package.module:function', imported when first called; None: nothing to do


def import_function(path: str):
    module, name = path.split(':')
    return getattr(importlib.import_module(module), name)


def _call(hook: Hook, *args, default=None, **kwargs):
    return import_function(hook)(*args, **kwargs) if hook else default


@dataclass(frozen=True)
class SampleType:
    """A ``--csv-dataset-sample-type`` value. Hooks take the parsed training args (or the CLI's args)."""
    name: str
    data_builder: str  # (args, preprocess_fns, epoch=, tokenizer=) -> OpenCLIP's {'train': DataInfo, 'val': ...}
    data_check: str  # (args) -> None: the data checks run before the run creates logs/<name>; raises
    validation: str  # (model, info, args, epoch=) -> metrics dict, for the 'val' DataInfo the builder returned
    add_args: Hook = None  # (parser) -> None: the training flags of this sample type
    check_args: Hook = None  # (args) -> None: refuses bad flag combinations (ValueError); never changes args
    configure: Hook = None  # (args) -> None: the run policy this sample type sets from checked args
    shard_fields: Tuple[str, ...] = ()  # json keys every training shard sample carries
    val_shard_fields: Tuple[str, ...] = ()  # ... and every validation shard sample
    add_shard_args: Hook = None  # (parser) -> None: make_shards flags of this sample type
    shard_records: Hook = None  # (args) -> iterable of (image path, json dict): make_shards' rows
    add_cli_args: Hook = None  # (parser) -> None: rank CLI flags of this sample type
    read_rows: Hook = None  # (args, model) -> [{'image', 'prompt', 'category', 'target'}]: a CSV for the rank CLI
    report: Hook = None  # (args, model, rows) -> dict: the rank CLI's metrics (printed) and pictures of scored rows

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None):
        return import_function(self.data_builder)(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)

    def check_data(self, args) -> None:
        import_function(self.data_check)(args)

    def validate(self, model, info, args, epoch=None) -> dict:
        return import_function(self.validation)(model, info, args, epoch=epoch)


@dataclass(frozen=True)
class RankLoss:
    """A ``--loss-opt`` value."""
    name: str
    builder: str  # (args) -> loss module, called as OpenCLIP calls its losses: loss(**model_out, output_dict=True)
    sample_type: Optional[str] = None  # trains on the targets of this sample type; None: image-caption data
    forms_pairs: bool = False  # orders pairs of images (what --rank-global-pairs gathers)
    needs_pair_head: bool = False  # needs the pair head's logits in each training batch
    add_args: Hook = None  # (parser) -> None
    check_args: Hook = None  # (args) -> None: refuses bad flag combinations (ValueError)

    def build(self, args):
        return import_function(self.builder)(args)


# Derived configs whose base is not simply the name without the suffix.
BASE_MODEL_ALIASES = {
    'convnext_base_w_224': 'convnext_base_w',  # same towers as convnext_base_w, 224 px
    'ViT-B-16-plus': 'ViT-B-16-plus-240',  # ViT-B-16-plus has no weights; -240 does (pos-embed is resized)
    'vgg16-RN50': 'RN50',  # OrdinalCLIP's MORPH setup: CLIP RN50's text tower (the image tower comes from timm)
}


@dataclass(frozen=True)
class RankFamily:
    """A model family: the config key that selects it and the model classes it builds."""
    name: str
    config_key: str  # its presence in a model config selects this family
    suffix: str  # derived config names: '<base><suffix>'
    model_module: str  # module holding the model classes (imported on first use)
    clip_class: str  # built where OpenCLIP would build ``CLIP``
    custom_text_class: str  # ... and ``CustomTextCLIP``
    default_loss: str  # --loss-opt when none is given
    sample_types: Tuple[str, ...]  # --csv-dataset-sample-type values this family trains on (the first: the CLI's)
    # images resized to the square input without cropping (the adapter's data), else OpenCLIP's preprocessing
    square_resize: bool = True
    base_aliases: Mapping[str, str] = field(default_factory=lambda: BASE_MODEL_ALIASES)
    add_args: Hook = None  # (parser) -> None: training flags of this family
    check_args: Hook = None  # (args) -> None: refuses bad flag combinations (ValueError)
    configure: Hook = None  # (args) -> None: the run policy this family's models read (set once, after checks)
    start_check: Hook = None  # (args, model_cfg) -> None: refuses a run of this config (ValueError)
    num_ranks: Hook = None  # (family config dict) -> int: the fixed set of ranks, for families that have one

    def model_class(self, custom_text: bool):
        module = importlib.import_module(self.model_module)
        return getattr(module, self.custom_text_class if custom_text else self.clip_class)

    def ranks_of(self, model_cfg: Optional[Mapping]) -> Optional[int]:
        """The number of ranks a config of this family predicts (None: scores, not ranks)."""
        return _call(self.num_ranks, (model_cfg or {}).get(self.config_key) or {})


FAMILIES: Dict[str, RankFamily] = {}
LOSSES: Dict[str, RankLoss] = {}
SAMPLE_TYPES: Dict[str, SampleType] = {}


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


def load_plugins() -> None:
    """Register what other installed packages declare under the ``open_clip_rank.plugins`` entry point group."""
    from importlib.metadata import entry_points
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        try:
            entry.load()()
        except Exception as err:
            raise RuntimeError(f"open_clip_rank plugin {entry.name!r} ({entry.value}) failed to register: "
                               f"{type(err).__name__}: {err}") from err
        _logger.debug(f"open_clip_rank plugin {entry.name} registered")


# --- lookups -----------------------------------------------------------------------------------------

def all_hooks(attribute: str):
    """Every registered sample type's, loss's and family's ``attribute`` hook that is set, each once, in that order
    (two losses may share one, e.g. the pair losses' flags)."""
    seen = set()
    for entry in (*SAMPLE_TYPES.values(), *LOSSES.values(), *FAMILIES.values()):
        hook = getattr(entry, attribute, None)
        if hook and hook not in seen:
            seen.add(hook)
            yield hook


def families_training_on(sample_type: str):
    """The families whose models train on ``sample_type`` (e.g. for a hint naming their model names)."""
    return [f for f in FAMILIES.values() if sample_type in f.sample_types]


def family_for_config(model_cfg: Optional[Mapping]) -> Optional[RankFamily]:
    """The family of a model config dict (None: a plain OpenCLIP config)."""
    found = [f for f in FAMILIES.values() if model_cfg and f.config_key in model_cfg]
    if len(found) > 1:
        raise ValueError(f"a model config may carry one of {[f.config_key for f in found]}, not several.")
    return found[0] if found else None


def family_for_model(model) -> Optional[RankFamily]:
    """The family of a built model (DDP-wrapped or not); None for plain OpenCLIP models."""
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
    """The shipped folder, then the folders named by OPEN_CLIP_RANK_MODEL_CONFIGS."""
    extra = [Path(p) for p in os.environ.get(EXTRA_CONFIGS_ENV, '').split(os.pathsep) if p]
    for folder in extra:
        if not folder.exists():
            raise RuntimeError(f"{EXTRA_CONFIGS_ENV} names {folder}, which does not exist.")
    return [CONFIG_DIR, *extra]


def _register_everything():
    """The built-in registrations (``builtin.py``), then the installed plugins'."""
    from . import builtin  # noqa: F401  (its import registers the built-in families, losses, sample types)
    load_plugins()


_register_everything()
