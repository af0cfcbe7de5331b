"""The families' data as OpenCLIP's ``get_data`` returns it: ``{'train': DataInfo, 'val': RankDataInfo}``.

The data builders and checks of the ``--csv-dataset-sample-type`` values registered in ``registry.py``;
this is the one data module that imports ``open_clip_train`` at import time (its ``DataInfo`` / ``SharedEpoch``, through ``compat.openclip_data``).
"""
import functools
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler
from torch.utils.data.distributed import DistributedSampler


from ..losses import PAIR_HEAD_LOSSES, resolved_loss_name
from ..registry import families_training_on, family_for_model_name
from ..compat import openclip_data, read_model_config
from .dataset import RankDataset, collate_rank_batch
from .ordinal import OrdinalDataset, collate_ordinal_batch, load_ordinal_table
from .sampler import RankBatchSampler
from .shards import check_shard_data, get_ordinal_shard_data, get_rank_shard_data, uses_shards
from .table import RankDataError, RankTable, load_rank_table
from .transforms import rank_transforms

DataInfo, SharedEpoch = openclip_data('DataInfo', 'SharedEpoch')
_logger = logging.getLogger(__name__)


@dataclass
class RankDataInfo(DataInfo):
    """Validation data that OpenCLIP's ``evaluate`` hands to the plugin's evaluation of its sample type."""
    table: Optional[object] = None  # RankTable / OrdinalTable
    sample_type: str = 'rank'


def _table_for(args, path, is_train):
    return load_rank_table(
        path, img_key=args.csv_img_key, caption_key=args.csv_caption_key, value_key=args.csv_value_key,
        category_key=args.csv_category_key, weight_key=args.csv_weight_key, sep=args.csv_separator,
        require_category=is_train, check_category_in_caption=is_train and args.negative_ratio > 0)


def _loader(dataset, batch_sampler, args, with_pairs=True, global_pairs=False):
    collate = functools.partial(collate_rank_batch, with_pairs=with_pairs, global_pairs=global_pairs)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available())


def _cached_loader(args, table, deterministic_transform, tokenizer, batch_sampler, with_pairs, global_pairs):
    """``--rank-feature-cache``: samples from the frozen-tower cache (both flip views stored; see
    ``feature_cache.py``), built from the model ``--lock-image`` locked."""
    from ..feature_cache import FeatureCacheError, build_cache, locked_model
    from .cached import CachedRankDataset, collate_cached_rank_batch
    model = locked_model()
    if model is None:
        raise RankDataError("--rank-feature-cache needs the model locked by --lock-image before the data is built "
                            "(as open_clip_train.main does).")
    try:
        cache = build_cache(args, model, table, deterministic_transform)
    except FeatureCacheError as err:
        raise RankDataError(str(err)) from err
    dataset = CachedRankDataset(table, deterministic_transform, tokenizer, cache.header_path)
    collate = functools.partial(collate_cached_rank_batch, cache_path=cache.header_path, with_pairs=with_pairs,
                                global_pairs=global_pairs)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available())


def check_model_trains_on(args, sample_type: str):
    family = family_for_model_name(args.model)
    if family is None or sample_type not in family.sample_types:
        raise RankDataError(
            f"--csv-dataset-sample-type {sample_type} trains ranking models, but --model {args.model} is not one "
            f"(its config has no key of a family training on it); use a "
            f"{' or '.join('*' + f.suffix for f in families_training_on(sample_type))} model "
            f"(open_clip.list_models()).")


def check_rank_data(args):
    """``--csv-dataset-sample-type rank``: the checks ``get_rank_data`` makes, before anything is built."""
    check_model_trains_on(args, 'rank')
    if uses_shards(args):
        check_shard_data(args, 'rank')
        return
    for path, is_train in ((args.train_data, True), (args.val_data, False)):
        if path:
            _table_for(args, path, is_train=is_train)


def check_ordinal_data(args):
    """``--csv-dataset-sample-type ordinal``: the checks ``get_ordinal_data`` makes, before anything is built."""
    check_model_trains_on(args, 'ordinal')
    if uses_shards(args):
        check_shard_data(args, 'ordinal')
        return
    for path in (args.train_data, args.val_data):
        if path:
            _ordinal_table(args, path, _num_ranks(args))


def get_rank_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """Train and validation rank data for ``--csv-dataset-sample-type rank``.

    Train batches run the pair head only when the loss needs it (``PAIR_HEAD_LOSSES``).
    """
    check_model_trains_on(args, 'rank')
    with_pairs = resolved_loss_name(args) in PAIR_HEAD_LOSSES
    train_transform, val_transform = rank_transforms(preprocess_fns[1])
    if uses_shards(args):  # --dataset-type webdataset: streamed per-category buckets (data/shards.py)
        return get_rank_shard_data(args, train_transform, val_transform, tokenizer, epoch, with_pairs)
    data = {}
    if args.train_data:
        table = _table_for(args, args.train_data, is_train=True)
        shared_epoch = SharedEpoch(epoch)
        relevance_max = args.relevance_max_score if getattr(args, 'train_with_relevance_score', False) else 0
        global_pairs = bool(getattr(args, 'rank_global_pairs', False))
        sampler = RankBatchSampler(table, args.batch_size, args.negative_ratio, seed=args.seed,
                                   rank=args.rank, world_size=args.world_size, shared_epoch=shared_epoch,
                                   relevance_max=relevance_max, global_pairs=global_pairs)
        if getattr(args, 'rank_feature_cache', None):
            loader = _cached_loader(args, table, val_transform, tokenizer, sampler, with_pairs, global_pairs)
        else:
            loader = _loader(RankDataset(table, train_transform, tokenizer), sampler, args, with_pairs, global_pairs)
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


def _num_ranks(args) -> int:
    from ..models.ordinal_prompts import OrdinalCfg
    cfg = (read_model_config(args.model) or {}).get('ordinal_cfg') or {}
    return int(cfg.get('num_ranks', OrdinalCfg.num_ranks))


def _ordinal_table(args, path, num_ranks):
    return load_ordinal_table(path, num_ranks, img_key=args.csv_img_key, value_key=args.csv_value_key,
                              sep=args.csv_separator, image_root=args.image_root)


def get_ordinal_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """Shuffled ordinary batches of (image, label) for ``--csv-dataset-sample-type ordinal``, distributed-aware
    (each process its own shard, reshuffled per epoch); sequential, unsharded validation."""
    check_model_trains_on(args, 'ordinal')
    num_ranks = _num_ranks(args)
    train_transform, val_transform = preprocess_fns
    if uses_shards(args):  # --dataset-type webdataset (data/shards.py)
        return get_ordinal_shard_data(args, train_transform, val_transform, num_ranks, epoch)
    data = {}
    if args.train_data:
        table = _ordinal_table(args, args.train_data, num_ranks)
        global_batch = args.batch_size * args.world_size
        if len(table) < global_batch:
            raise RankDataError(f"{args.train_data} has {len(table)} images, fewer than one batch of {global_batch} "
                                f"(--batch-size x processes); lower --batch-size or add data.")
        dataset = OrdinalDataset(table, train_transform, train=True)
        if args.distributed:
            sampler = DistributedSampler(dataset, shuffle=True, seed=args.seed, drop_last=True)
        else:
            sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(args.seed))
        loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler, drop_last=True,
                            num_workers=args.workers, collate_fn=collate_ordinal_batch,
                            pin_memory=torch.cuda.is_available())
        loader.num_batches = len(loader)
        loader.num_samples = len(loader) * global_batch
        data['train'] = DataInfo(loader, sampler=sampler if args.distributed else None,
                                 shared_epoch=SharedEpoch(epoch))
        _logger.info(f"Ordinal training data: {len(table)} images, {num_ranks} ranks, {len(loader)} batches of "
                     f"{args.batch_size} per process per epoch.")
    if args.val_data:
        table = _ordinal_table(args, args.val_data, num_ranks)
        dataset = OrdinalDataset(table, val_transform, train=False)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                            collate_fn=collate_ordinal_batch)
        loader.num_batches = len(loader)
        loader.num_samples = len(table)
        data['val'] = RankDataInfo(loader, table=table, sample_type='ordinal')
    return data

