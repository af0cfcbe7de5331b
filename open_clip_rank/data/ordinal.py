"""The 'ordinal' sample type: images with integer rank labels in [0, num_ranks), for ``*-ordinal`` models.

The data (CSV or official list files, ``ordinal_dataset.py``) comes as shuffled ordinary batches of (image, label),
distributed-aware; validation is sequential and unsharded. What the registry asks of it (``builtin.py``): its data
checks, OpenCLIP's ``get_data`` shape (shards in ``ordinal_shards.py``), ``make_shards`` records and
the rank CLI's rows. Validation metrics and pictures: ``evaluation/ordinal.py``.
"""
import logging

import torch
from torch.utils.data import DataLoader, RandomSampler
from torch.utils.data.distributed import DistributedSampler

from ..registry import SAMPLE_TYPES, num_ranks_of_model_name
from .loaders import DataInfo, RankDataInfo, SharedEpoch, check_fills_one_batch, check_model_trains_on
from .ordinal_dataset import OrdinalDataset, collate_ordinal_batch, load_ordinal_table
from .ordinal_options import (check_rank_window, official_transforms, subset_description, training_subset,
                              validation_subset)
from .shards import check_shard_data, uses_shards
from .table import image_path_options

_logger = logging.getLogger(__name__)


# --- OpenCLIP's get_data -------------------------------------------------------------------------------

def check_ordinal_data(args):
    """``--csv-dataset-sample-type ordinal``: the checks ``get_ordinal_data`` makes, before anything is built."""
    check_model_trains_on(args, 'ordinal')
    check_rank_window(getattr(args, 'ordinal_rank_window', None), _num_ranks(args))
    if uses_shards(args):
        check_shard_data(args, SAMPLE_TYPES['ordinal'])
        return
    if args.train_data:  # the subsets are drawn as get_ordinal_data draws them (same --seed), without logging
        table = training_subset(_ordinal_table(args, args.train_data, _num_ranks(args)), args, log=False)
        check_fills_one_batch(len(table), _described(args.train_data, args, train=True), args)
    if args.val_data:
        validation_subset(_ordinal_table(args, args.val_data, _num_ranks(args)), args, log=False)


def _described(path, args, train):
    """The file, and the subset flags that shrank it, for a message about its size."""
    subset = subset_description(args, train)
    return f"{path} ({subset})" if subset else path


def _num_ranks(args) -> int:
    return num_ranks_of_model_name(args.model)


def _ordinal_table(args, path, num_ranks):
    return load_ordinal_table(path, num_ranks, img_key=args.csv_img_key, value_key=args.csv_value_key,
                              sep=args.csv_separator, **image_path_options(args))


def get_ordinal_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """Shuffled ordinary batches of (image, label) for ``--csv-dataset-sample-type ordinal``, distributed-aware
    (each process its own shard, reshuffled per epoch); sequential, unsharded validation."""
    check_model_trains_on(args, 'ordinal')
    num_ranks = _num_ranks(args)
    train_transform, val_transform = preprocess_fns
    if getattr(args, 'ordinal_official_transforms', False):
        train_transform, val_transform = official_transforms(val_transform)
        _logger.info("Ordinal data: the official preprocessing (--ordinal-official-transforms): train "
                     + ', '.join(map(repr, train_transform.transforms)) + "; validation "
                     + ', '.join(map(repr, val_transform.transforms)) + ".")
    if uses_shards(args):  # --dataset-type webdataset
        from .ordinal_shards import get_ordinal_shard_data
        return get_ordinal_shard_data(args, train_transform, val_transform, num_ranks, epoch)
    data = {}
    if args.train_data:
        table = training_subset(_ordinal_table(args, args.train_data, num_ranks), args)
        check_fills_one_batch(len(table), _described(args.train_data, args, train=True), args)
        global_batch = args.batch_size * args.world_size
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
        table = validation_subset(_ordinal_table(args, args.val_data, num_ranks), args)
        dataset = OrdinalDataset(table, val_transform, train=False)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.workers,
                            collate_fn=collate_ordinal_batch)
        loader.num_batches = len(loader)
        loader.num_samples = len(table)
        data['val'] = RankDataInfo(loader, table=table, sample_type='ordinal')
    return data


# --- flags, make_shards and the rank CLI ---------------------------------------------------------------

def add_ordinal_shard_args(parser):
    parser.add_argument('--num-ranks', type=int, default=100, help='ordinal: labels must lie in [0, num-ranks)')


def ordinal_shard_records(args):
    """(image path, json) per image of ordinal data, read with training's checks (every label kept)."""
    t = load_ordinal_table(args.csv, args.num_ranks, img_key=args.csv_img_key, value_key=args.csv_value_key,
                           sep=args.csv_separator, **image_path_options(args))
    for path, labels in zip(t.paths, t.labels):
        meta = {'value': labels[len(labels) // 2]}
        if len(labels) > 1:
            meta['labels'] = labels
        yield path, meta


def read_ordinal_rows(args, model):
    """The rank CLI's rows of an ordinal CSV / list file (``filepath[, value]`` or ``path label``); no prompts."""
    table = load_ordinal_table(args.csv, model.num_ranks, img_key=args.csv_img_key, value_key=args.csv_value_key,
                               sep=args.csv_separator, check_files=False, require_labels=False,
                               **image_path_options(args))
    targets = table.eval_labels() or [None] * len(table)
    return [{'image': image, 'prompt': '', 'category': '', 'target': target}
            for image, target in zip(table.paths, targets)]
