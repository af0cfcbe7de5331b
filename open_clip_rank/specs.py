"""What a method family, a loss and a sample type declare: the registry's entries (``registry.py`` holds the tables).

Hooks are ``'package.module:function'`` paths, imported when first called, so declaring an entry imports nothing
heavy (no torch, no OpenCLIP).
"""
import importlib
from dataclasses import dataclass, field
from typing import Mapping, Optional, Tuple

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
    # (args, model, transform) -> the rank CLI's image transform (e.g. the preprocessing a training option used)
    cli_transform: Hook = None
    # {metric key of ``validation``'s dict: 'max' (higher is better) or 'min'}: what --rank-save-best may keep the
    # best checkpoint by ('CATEGORY/<metric>' keys take the goal of <metric>)
    metric_goals: Mapping[str, str] = field(default_factory=dict)
    # model cards (push_to_hf_hub): the validation metrics a card lists (keys of ``validation``'s dict; its
    # 'CATEGORY/<metric>' entries become rows), and what a card says of a training file
    card_metrics: Tuple[str, ...] = ()
    describe_data: Hook = None  # (path, options) -> {'rows', 'instructions', 'categories', 'targets': [lo, hi], ...}

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
    summary: str = ''  # one line for model cards: what training with it gives the model
    # (args, get_data, preprocess_fns, epoch, tokenizer) -> data: the loss's take on OpenCLIP's image-caption data
    # (``get_data`` is OpenCLIP's; e.g. RankCLIP's second view of every sample)
    default_data: Hook = None

    def build(self, args):
        return import_function(self.builder)(args)


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
    # derived names whose base is not simply the name without the suffix: {'<base>': '<OpenCLIP model>'}
    base_aliases: Mapping[str, str] = field(default_factory=dict)
    add_args: Hook = None  # (parser) -> None: training flags of this family
    check_args: Hook = None  # (args) -> None: refuses bad flag combinations (ValueError)
    configure: Hook = None  # (args) -> None: the run policy this family's models read (set once, after checks)
    start_check: Hook = None  # (args, model_cfg) -> None: refuses a run of this config (ValueError)
    after_epoch: Hook = None  # (args, epoch) -> None: after each of OpenCLIP's training epochs (e.g. a report)
    num_ranks: Hook = None  # (family config dict) -> int: the fixed set of ranks, for families that have one
    # (model config, training data description or None) -> {'description', 'score' (its meaning: direction, range,
    # units), optional 'pipeline_tag', 'details': {...}}: this family's part of a model card (push_to_hf_hub)
    model_card: Hook = None

    def model_class(self, custom_text: bool):
        module = importlib.import_module(self.model_module)
        return getattr(module, self.custom_text_class if custom_text else self.clip_class)

    def ranks_of(self, model_cfg: Optional[Mapping]) -> Optional[int]:
        """The number of ranks a config of this family predicts (None: scores, not ranks)."""
        return _call(self.num_ranks, (model_cfg or {}).get(self.config_key) or {})
