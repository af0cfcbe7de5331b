"""The 'rank' sample type: batches of one category (instruction) each, with targets and re-worded negatives.

What the registry asks of it (``builtin.py``): its training flags and their checks, the data checks run before a
run starts, OpenCLIP's ``get_data`` shape (CSV here, shards in ``rank_shards.py``), ``make_shards`` records and
the rows the rank CLI reads from a CSV. Validation metrics: ``evaluation/rank.py``.
"""
import functools
import logging

import torch
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler

from ..registry import SAMPLE_TYPES, resolved_loss
from .dataset import RankDataset, collate_rank_batch
from .loaders import DataInfo, RankDataInfo, SharedEpoch, check_fills_one_batch, check_model_trains_on
from .sampler import RankBatchSampler
from .shards import check_shard_data, uses_shards
from .table import RankDataError, image_path_options, load_rank_table
from .transforms import rank_transforms

_logger = logging.getLogger(__name__)


# --- training flags ------------------------------------------------------------------------------------

def add_rank_data_args(parser):
    group = parser.add_argument_group('open_clip_rank: rank data (--csv-dataset-sample-type rank)')
    group.add_argument(
        '--negative-ratio', type=float, default=0.2,
        help='Share of each rank batch drawn from other categories, captioned with the batch category (their '
             'category word replaced, whole words only), target 0. Above 0, every caption must hold its category as '
             'a whole word and no value may lie below 0.')
    group.add_argument(
        '--train-with-relevance-score', action='store_true', default=False,
        help='As the original option: each training batch draws a reference value Y in [0, --relevance-max-score); '
             'captions become "<instruction> by the relevance count to Y." and targets |value - Y|.')
    group.add_argument('--relevance-max-score', type=int, default=13,
                       help='Reference values for --train-with-relevance-score are 0..N-1 (the original: 13, counting).')
    group.add_argument('--csv-category-key', type=str, default='cname',
                       help='CSV column of the category word that appears (as a whole word) in the caption.')
    group.add_argument('--csv-weight-key', type=str, default='sample_weights_by_class',
                       help='Optional CSV column of per-row sampling weights within a category.')


def check_rank_data_args(args):
    if args.train_with_relevance_score and args.csv_dataset_sample_type != 'rank':
        raise ValueError("--train-with-relevance-score re-words rank batches: add --csv-dataset-sample-type rank.")
    if args.csv_dataset_sample_type != 'rank':
        return
    if not 0.0 <= args.negative_ratio < 1.0:
        raise ValueError(f"--negative-ratio must be in [0, 1), got {args.negative_ratio}.")
    if args.train_with_relevance_score and args.relevance_max_score < 1:
        raise ValueError(f"--relevance-max-score must be >= 1, got {args.relevance_max_score}.")


def configure_rank_run(args):
    """A rank model uses the same parameters every step (e.g. never the pair head with the single-head loss):
    DDP's static graph handles such unused parameters without find_unused_parameters."""
    if args.csv_dataset_sample_type == 'rank':
        args.ddp_static_graph = True


# --- OpenCLIP's get_data --------------------------------------------------------------------------------

def _table_for(args, path, is_train):
    negatives = is_train and args.negative_ratio > 0
    # negatives get target 0 (NEGATIVE_TARGET); with --train-with-relevance-score every target is |value - Y| instead
    relevance = getattr(args, 'train_with_relevance_score', False)
    return load_rank_table(
        path, img_key=args.csv_img_key, caption_key=args.csv_caption_key, value_key=args.csv_value_key,
        category_key=args.csv_category_key, weight_key=args.csv_weight_key, sep=args.csv_separator,
        require_category=is_train, check_category_in_caption=negatives,
        check_negative_targets=negatives and not relevance, **image_path_options(args))


def _loader(dataset, batch_sampler, args, with_pairs=True, global_pairs=False):
    collate = functools.partial(collate_rank_batch, with_pairs=with_pairs, global_pairs=global_pairs)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available())


def _cached_loader(args, table, deterministic_transform, tokenizer, batch_sampler, with_pairs, global_pairs):
    """``--rank-feature-cache``: samples from the frozen-tower cache (both flip views stored; see
    ``feature_cache.py``), built from the model ``--lock-image`` locked."""
    from ..integration.run_state import current_run
    from .feature_cache import FeatureCacheError, build_cache
    from .cached import CachedRankDataset, collate_cached_rank_batch
    run = current_run()
    model = run.locked_model() if run is not None else None
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


def check_rank_data(args):
    """``--csv-dataset-sample-type rank``: the checks ``get_rank_data`` makes, before anything is built."""
    check_model_trains_on(args, 'rank')
    if uses_shards(args):
        check_shard_data(args, SAMPLE_TYPES['rank'])
        return
    for path, is_train in ((args.train_data, True), (args.val_data, False)):
        if path:
            table = _table_for(args, path, is_train=is_train)
            if is_train:
                check_fills_one_batch(len(table), path, args)


def get_rank_data(args, preprocess_fns, epoch=0, tokenizer=None):
    """Train and validation rank data for ``--csv-dataset-sample-type rank``.

    Train batches run the pair head only when the loss needs it (``RankLoss.needs_pair_head``).
    """
    check_model_trains_on(args, 'rank')
    loss = resolved_loss(args)
    with_pairs = loss is not None and loss.needs_pair_head
    train_transform, val_transform = rank_transforms(preprocess_fns[1])
    if uses_shards(args):  # --dataset-type webdataset: streamed per-category buckets
        from .rank_shards import get_rank_shard_data
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
        data['val'] = RankDataInfo(loader, table=table, sample_type='rank')
    return data


# --- make_shards and the rank CLI ---------------------------------------------------------------------

def add_rank_shard_args(parser):
    parser.add_argument('--csv-category-key', default='cname', help='rank: CSV column of the category word')
    parser.add_argument('--csv-weight-key', default='sample_weights_by_class',
                        help='rank: optional CSV column of per-row sampling weights')
    parser.add_argument('--negative-ratio', type=float, default=0.2,
                        help='rank: the --negative-ratio you will train with (default: training\'s); above 0 every '
                             'caption must contain its category as a whole word (negatives re-word it) and no value '
                             'may lie below 0 (the negatives\' target), as the CSV path checks')


def rank_shard_records(args):
    """(image path, json) per row of a rank CSV, read with training's checks."""
    t = load_rank_table(args.csv, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                        value_key=args.csv_value_key, category_key=args.csv_category_key,
                        weight_key=args.csv_weight_key, sep=args.csv_separator,
                        check_category_in_caption=args.negative_ratio > 0,
                        check_negative_targets=args.negative_ratio > 0, **image_path_options(args))
    for i, path in enumerate(t.paths):
        meta = {'value': float(t.values[i]), 'category': t.category_names[t.category_ids[i]],
                'caption': t.captions[i]}
        if t.weights is not None:
            meta['weight'] = float(t.weights[i])
        yield path, meta


def read_rank_rows(args, model=None):
    """The rank CLI's rows of a CSV in the training format: each image under its own row's instruction.

    Same reader and checks as training data; images are not required to exist (unreadable ones are skipped).
    """
    table = load_rank_table(args.csv, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                            value_key=args.csv_value_key, category_key=args.csv_category_key, weight_key=None,
                            sep=args.csv_separator, require_category=False, require_value=False, check_files=False,
                            **image_path_options(args))
    targets = [None] * len(table) if table.values is None else table.values.tolist()
    return [{'image': path, 'prompt': prompt, 'category': table.category_names[c], 'target': target}
            for path, prompt, c, target in zip(table.paths, table.captions, table.category_ids.tolist(), targets)]
