"""Rank data as OpenCLIP's ``get_data`` returns it: ``{'train': DataInfo, 'val': RankDataInfo}``.

Used by the training hook for ``--csv-dataset-sample-type rank``; this is the one data module that
imports ``open_clip_train`` (for its ``DataInfo`` / ``SharedEpoch``).
"""
import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from open_clip_train.data import DataInfo, SharedEpoch

from ..losses import PAIR_HEAD_LOSSES, resolved_loss_name
from ..registry import family_for_model_name
from .dataset import RankDataset, collate_rank_batch
from .sampler import RankBatchSampler
from .table import RankDataError, RankTable, load_rank_table
from .transforms import rank_transforms

_logger = logging.getLogger(__name__)


@dataclass
class RankDataInfo(DataInfo):
    """Validation data that OpenCLIP's ``evaluate`` hands to the plugin's ranking evaluation."""
    table: Optional[RankTable] = None


def _table_for(args, path, is_train):
    return load_rank_table(
        path, img_key=args.csv_img_key, caption_key=args.csv_caption_key, value_key=args.csv_value_key,
        category_key=args.csv_category_key, weight_key=args.csv_weight_key, sep=args.csv_separator,
        require_category=is_train, check_category_in_caption=is_train and args.negative_ratio > 0)


def _loader(dataset, batch_sampler, args, with_pairs=True):
    collate = functools.partial(collate_rank_batch, with_pairs=with_pairs)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available())


def check_model_trains_on(args, sample_type: str):
    family = family_for_model_name(args.model)
    if family is None or sample_type not in family.sample_types:
        raise RankDataError(
            f"--csv-dataset-sample-type {sample_type} trains ranking models, but --model {args.model} is not one "
            f"(its config has no rank-family key); use a *-adapter model (open_clip.list_models()).")


def get_rank_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """Train and validation rank data for ``--csv-dataset-sample-type rank``.

    Train batches run the pair head only when the loss needs it (``PAIR_HEAD_LOSSES``).
    """
    check_model_trains_on(args, 'rank')
    with_pairs = resolved_loss_name(args) in PAIR_HEAD_LOSSES
    train_transform, val_transform = rank_transforms(preprocess_fns[1])
    data = {}
    if args.train_data:
        table = _table_for(args, args.train_data, is_train=True)
        shared_epoch = SharedEpoch(epoch)
        sampler = RankBatchSampler(table, args.batch_size, args.negative_ratio, seed=args.seed,
                                   rank=args.rank, world_size=args.world_size, shared_epoch=shared_epoch)
        loader = _loader(RankDataset(table, train_transform, tokenizer), sampler, args, with_pairs)
        loader.num_batches = len(sampler)
        loader.num_samples = len(sampler) * args.batch_size * args.world_size
        data['train'] = DataInfo(loader, shared_epoch=shared_epoch)
        _logger.info(f"Rank training data: {len(table)} rows, {len(table.category_names)} categories, "
                     f"{len(sampler)} batches of {args.batch_size} per process per epoch "
                     f"({sampler.num_negatives} negatives per batch).")
    if args.val_data:
        table = _table_for(args, args.val_data, is_train=False)
        dataset = RankDataset(table, val_transform, tokenizer, replace_unreadable=False)
        sampler = BatchSampler(SequentialSampler(dataset), args.batch_size, drop_last=False)
        loader = _loader(dataset, sampler, args, with_pairs=False)
        loader.num_batches = len(sampler)
        loader.num_samples = len(table)
        data['val'] = RankDataInfo(loader, table=table)
    return data
