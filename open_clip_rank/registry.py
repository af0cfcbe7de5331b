"""The method families the plugin brings to OpenCLIP, and the model configs it ships.

A family is a model-config key (``adapter_cfg``): any OpenCLIP config carrying it builds that family's
model classes, whose default loss, data sample types and derived-name suffix (``RN50`` ->
``RN50-adapter``) are declared here. A sample type (a ``--csv-dataset-sample-type`` value) is its data
builder, the checks of its data run before a training run starts, and its validation, also declared here.
``hook.py``, ``preflight.py``, ``evaluate.py`` and inference dispatch through these tables and nothing else:
a family that trains on an existing sample type with an existing loss is one model module plus one
``register_family`` call below; a new sample type is its functions plus one ``register_sample_type`` call; a
new loss adds its builder to ``losses.LOSSES`` (and, when it trains on targets, its sample type to
``LOSS_SAMPLE_TYPES``).
"""
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Mapping, Optional, Tuple

# Derived configs whose base is not simply the name without the suffix.
BASE_MODEL_ALIASES = {
    'convnext_base_w_224': 'convnext_base_w',  # same towers as convnext_base_w, 224 px
    'ViT-B-16-plus': 'ViT-B-16-plus-240',  # ViT-B-16-plus has no weights; -240 does (pos-embed is resized)
    'vgg16-RN50': 'RN50',  # OrdinalCLIP's MORPH setup: CLIP RN50's text tower (the image tower comes from timm)
}
# Extra model-config folders (os.pathsep-separated) registered with OpenCLIP, e.g. for your own configs.
EXTRA_CONFIGS_ENV = 'OPEN_CLIP_RANK_MODEL_CONFIGS'


@dataclass(frozen=True)
class RankFamily:
    name: str
    config_key: str  # its presence in a model config selects this family
    suffix: str  # derived config names: '<base><suffix>'
    model_module: str  # module holding the model classes (imported on first use)
    clip_class: str  # built where OpenCLIP would build ``CLIP``
    custom_text_class: str  # ... and ``CustomTextCLIP``
    default_loss: str  # --loss-opt when none is given
    sample_types: Tuple[str, ...]  # --csv-dataset-sample-type values this family trains on
    # images resized to the square input without cropping (the adapter's data), else OpenCLIP's preprocessing
    square_resize: bool = True
    base_aliases: Mapping[str, str] = field(default_factory=lambda: BASE_MODEL_ALIASES)

    def model_class(self, custom_text: bool):
        module = importlib.import_module(self.model_module)
        return getattr(module, self.custom_text_class if custom_text else self.clip_class)


def _import_function(path: str):
    module, name = path.split(':')
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class SampleType:
    """A ``--csv-dataset-sample-type`` value. Its functions are ``'module:function'`` paths, imported on first use
    (the data builders import ``open_clip_train``)."""
    name: str
    data_builder: str  # (args, preprocess_fns, epoch=, tokenizer=) -> OpenCLIP's {'train': DataInfo, 'val': ...}
    data_check: str  # (args) -> None: the CSV/shard checks run before the run creates logs/<name>; raises
    validation: str  # (model, info, args, epoch=) -> metrics dict, for the 'val' DataInfo the builder returned

    def get_data(self, args, preprocess_fns, epoch=0, tokenizer=None):
        return _import_function(self.data_builder)(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer)

    def check_data(self, args) -> None:
        _import_function(self.data_check)(args)

    def validate(self, model, info, args, epoch=None) -> dict:
        return _import_function(self.validation)(model, info, args, epoch=epoch)


SAMPLE_TYPES: Dict[str, SampleType] = {}


def register_sample_type(sample_type: SampleType) -> SampleType:
    if sample_type.name == 'default':
        raise ValueError("'default' is OpenCLIP's own CSV data, not a plugin sample type.")
    SAMPLE_TYPES[sample_type.name] = sample_type
    return sample_type


register_sample_type(SampleType(
    name='rank',  # batches of one category (instruction) each, with targets and re-worded negatives
    data_builder='open_clip_rank.data.loaders:get_rank_data',
    data_check='open_clip_rank.data.loaders:check_rank_data',
    validation='open_clip_rank.evaluate:ranking_validation',
))

register_sample_type(SampleType(
    name='ordinal',  # shuffled batches of (image, integer rank label)
    data_builder='open_clip_rank.data.loaders:get_ordinal_data',
    data_check='open_clip_rank.data.loaders:check_ordinal_data',
    validation='open_clip_rank.evaluate:ordinal_validation',
))


FAMILIES: Dict[str, RankFamily] = {}


def register_family(family: RankFamily) -> RankFamily:
    unknown = [t for t in family.sample_types if t not in SAMPLE_TYPES]
    if unknown:
        raise ValueError(f"family {family.name!r} trains on unregistered sample type(s) {unknown}; "
                         f"register_sample_type them first.")
    for other in FAMILIES.values():
        if other.name != family.name and family.config_key == other.config_key:
            raise ValueError(f"config key {family.config_key!r} already belongs to the {other.name} family.")
    FAMILIES[family.name] = family
    return family


register_family(RankFamily(
    name='adapter', config_key='adapter_cfg', suffix='-adapter', model_module='open_clip_rank.models.adapter',
    clip_class='RankAdapterCLIP', custom_text_class='RankAdapterCustomTextCLIP',
    default_loss='single-head',  # as the original training code
    sample_types=('rank',),
))

register_family(RankFamily(
    name='ordinal', config_key='ordinal_cfg', suffix='-ordinal', model_module='open_clip_rank.models.ordinal',
    clip_class='OrdinalCLIP', custom_text_class='OrdinalCustomTextCLIP',
    default_loss='ordinal',  # CE + KL, as the official runner
    sample_types=('ordinal',), square_resize=False,
))


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
    from .compat import read_model_config
    return family_for_config(read_model_config(model_name))


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
