"""Data, one module per sample type plus what they share.

Shared: ``batches`` (the rank batch container), ``table`` (rank CSV reading and validation), ``sampler`` (rank
batches of one category), ``dataset`` (samples and collation), ``transforms`` (resize without crop), ``loaders``
(OpenCLIP's ``get_data`` shape; imports ``open_clip_train`` at import time, so it is not imported here),
``shards`` (streaming webdataset shards as OpenCLIP does), ``feature_cache`` / ``cached`` (frozen-tower outputs).
Per sample type (declared in ``builtin.py``): ``rank`` + ``rank_shards``; ``ordinal`` + ``ordinal_shards`` over
``ordinal_dataset``. Nothing here imports ``models/``.
"""
from .dataset import RankDataset, collate_rank_batch
from .sampler import FixedEpoch, RankBatchSampler
from .table import RankDataError, RankTable, load_rank_table
from .transforms import rank_transforms
