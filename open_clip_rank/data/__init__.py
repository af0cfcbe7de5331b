"""Rank data, by concern: ``table`` (CSV reading and validation), ``sampler`` (rank batches),
``dataset`` (samples and collation), ``transforms`` (resize without crop), ``loaders`` (OpenCLIP's
``get_data`` shape; the only module here that imports ``open_clip_train`` at import time, so it is not imported
here), ``shards`` (rank/ordinal data streamed from webdataset shards; imports ``open_clip_train`` lazily).
"""
from .dataset import RankDataset, collate_rank_batch
from .sampler import FixedEpoch, RankBatchSampler
from .table import RankDataError, RankTable, load_rank_table
from .transforms import rank_transforms
