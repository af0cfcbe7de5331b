"""What every sample type's data builder returns: OpenCLIP's ``{'train': DataInfo, 'val': RankDataInfo}``.

The one data module that imports ``open_clip_train`` at import time (its ``DataInfo`` / ``SharedEpoch``, through
``compat.openclip_data``); the sample types' builders (``rank.py``, ``ordinal.py``, ...) import it.
"""
from dataclasses import dataclass
from typing import Optional

from ..integration.compat import openclip_data
from ..registry import families_training_on, family_for_model_name
from .table import RankDataError

DataInfo, SharedEpoch = openclip_data('DataInfo', 'SharedEpoch')


@dataclass
class RankDataInfo(DataInfo):
    """Validation data that OpenCLIP's ``evaluate`` hands to the plugin's validation of its sample type."""
    table: Optional[object] = None  # what the sample type's validation needs of the data (names, ranks, ...)
    sample_type: str = ''


def check_model_trains_on(args, sample_type: str):
    family = family_for_model_name(args.model)
    if family is None or sample_type not in family.sample_types:
        raise RankDataError(
            f"--csv-dataset-sample-type {sample_type} trains ranking models, but --model {args.model} is not one "
            f"(its config has no key of a family training on it); use a "
            f"{' or '.join('*' + f.suffix for f in families_training_on(sample_type))} model "
            f"(open_clip.list_models()).")


def check_fills_one_batch(num_rows: int, source, args) -> None:
    """Training data must fill one global batch (``--batch-size`` x processes). At the start checks ``args`` has no
    ``world_size`` yet: the launcher's (torchrun, SLURM) is read from the environment as OpenCLIP will."""
    from ..integration.compat import launch_world_size
    world_size = getattr(args, 'world_size', None) or launch_world_size()
    if num_rows < args.batch_size * world_size:
        raise RankDataError(f"{source} has {num_rows} rows, fewer than one batch per process (--batch-size "
                            f"{args.batch_size} x {world_size} process(es)); lower --batch-size or add data.")
