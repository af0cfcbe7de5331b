"""Rank and ordinal data streamed from webdataset shards (``--dataset-type webdataset``).

Shard layout (what ``python -m open_clip_rank.make_shards`` writes): per sample ``<key>.jpg|png|jpeg|webp``
plus ``<key>.json`` with ``value``, ``category`` (rank), ``caption``, optional ``weight`` (rank) or an
integer ``value`` (ordinal; optional ``labels`` list: a random one per training step, as the list files).

Training streams shards as OpenCLIP's own webdataset path does (its ``ResampledShards2`` / ``detshuffle2``,
``split_by_node`` / ``split_by_worker``, ``tarfile_to_samples_nothrow``, ``--train-num-samples`` or
``sizes.json``, its batches-per-worker arithmetic; a finite stream that ends early is read again, so every
process runs the same number of steps), then buckets decoded samples per category (``RankBuckets``): a bucket that
holds a batch's positives leaves as one rank batch, completed with ``--negative-ratio`` negatives drawn from
a pool of recent samples of other categories (their caption re-worded to the batch's category, target 0, as
the CSV path). Categories therefore reach batches in proportion to their share of the stream, not uniformly
as the CSV sampler draws them. Unreadable samples are skipped and counted in the log.
"""
import io
import json
import logging
import math
import os
import random
import zlib
from collections import deque
from dataclasses import dataclass
from typing import List

import numpy as np
import torch
from PIL import Image

from ..compat import openclip_data
from .dataset import RankDataset, collate_rank_batch
from .table import RankDataError

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ('jpg', 'jpeg', 'png', 'webp')
POOL_BATCHES = 4  # the negatives pool holds this many batches' worth of recent samples
MAX_BUFFERED_BATCHES = 32  # buckets beyond this many batches of samples: the fullest leaves early
SAMPLE_SHUFFLE = (1000, 100)  # (bufsize, initial) of the per-worker sample shuffle


def uses_shards(args) -> bool:
    """Webdataset rank/ordinal data: ``--dataset-type webdataset``, or ``auto`` with ``.tar`` URLs."""
    dataset_type = getattr(args, 'dataset_type', 'csv')  # namespaces built without it: CSV, as before
    if dataset_type == 'webdataset':
        return True
    if dataset_type == 'auto':
        data = getattr(args, 'train_data', None) or getattr(args, 'val_data', None) or ''
        return data.split('::')[0].endswith('.tar')
    return False


@dataclass
class ShardCategories:
    """What validation needs of a table (``category_names``), read from the shards' json."""
    category_names: List[str]
    source: str
    num_samples: int = 0
    sample_type: str = 'rank'
    num_ranks: int = 0


@dataclass
class _Counter:
    skipped: int = 0
    where: str = 'this data worker'


def _skip(counter, key, err):
    counter.skipped += 1
    _logger.warning(f"Skipping unreadable sample {key} ({type(err).__name__}: {err}); "
                    f"{counter.skipped} skipped so far in {counter.where}.")


def _category_id(name: str) -> int:
    """A stable id for a category seen in a stream (training ids are not used for metrics)."""
    return zlib.crc32(name.encode()) & 0x7fffffff


def _image_bytes(sample):
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"no image ({'/'.join(IMAGE_EXTENSIONS)}) in the sample")


def _meta(sample) -> dict:
    if 'json' not in sample:
        raise ValueError('no .json in the sample')
    meta = json.loads(sample['json'])
    if not isinstance(meta, dict):
        raise ValueError('its .json is not an object')
    return meta


def _key(sample):
    return f"{sample.get('__key__', '?')} in {sample.get('__url__', '?')}"


def decode_rank_samples(src, transform, counter=None, require_category=True):
    """Raw tar samples -> dicts (image tensor, caption, value, category, weight); bad ones skipped, counted."""
    counter = counter or _Counter()
    for sample in src:
        try:
            meta = _meta(sample)
            value = float(meta['value'])
            if not math.isfinite(value):
                raise ValueError(f"value {meta['value']!r} is not finite")
            caption = str(meta['caption'])
            category = str(meta['category']) if require_category or 'category' in meta else 'all'
            weight = float(meta.get('weight', 1.0))
            with Image.open(io.BytesIO(_image_bytes(sample))) as image:
                tensor = transform(image.convert('RGB'))
        except Exception as err:  # unreadable image, bad json, missing key: skip, count, keep going
            _skip(counter, _key(sample), err)
            continue
        yield dict(image=tensor, caption=caption, value=value, category=category, weight=max(weight, 0.0))


class RankBuckets:
    """Per-category bucketing of a decoded stream into rank batches ``(images, RankTexts)``.

    ``n_pos = int(B * (1 - ratio))`` positives of one category (as the CSV sampler's official count) fill a
    bucket; with a ``weight`` in the json, buckets fill to twice that and positives are drawn in proportion to
    weight (the rest wait for the next batch). Negatives come from a pool of the last ``POOL_BATCHES * B``
    samples of other categories. At the end of a finite stream, every non-empty bucket leaves as a batch
    padded with negatives (as a small category in the CSV sampler), so every category's samples reach a
    batch. Deterministic for (seed, epoch, rank, worker) and a given input order.
    """

    def __init__(self, batch_size, negative_ratio, tokenizer, seed=0, shared_epoch=None, rank=0,
                 with_pairs=True, relevance_max=0):
        self.batch_size = batch_size
        self.num_positives = int(batch_size * (1 - negative_ratio))
        self.tokenizer = tokenizer
        self.seed, self.rank, self.shared_epoch = seed, rank, shared_epoch
        self.with_pairs = with_pairs
        self.relevance_max = relevance_max

    def _rng(self):
        from torch.utils.data import get_worker_info
        info = get_worker_info()
        worker = info.id if info is not None else 0
        epoch = self.shared_epoch.get_value() if self.shared_epoch is not None else 0
        return np.random.default_rng([self.seed, epoch, self.rank, worker])

    def __call__(self, src):
        rng = self._rng()
        B, n_pos = self.batch_size, self.num_positives
        weighted = False
        buckets = {}
        pool = deque(maxlen=POOL_BATCHES * B)
        buffered = 0
        for sample in src:
            weighted = weighted or sample['weight'] != 1.0
            bucket = buckets.setdefault(sample['category'], [])
            bucket.append(sample)
            pool.append(sample)
            buffered += 1
            capacity = 2 * n_pos if weighted else n_pos
            if len(bucket) >= capacity:
                batch = self._batch(rng, sample['category'], bucket, pool, weighted)
                if batch is not None:
                    buffered -= n_pos
                    yield batch
            elif buffered > MAX_BUFFERED_BATCHES * B:  # many categories: the fullest leaves early
                category = max(buckets, key=lambda c: len(buckets[c]))
                before = len(buckets[category])
                batch = self._batch(rng, category, buckets[category], pool, weighted)
                if batch is not None:
                    buffered -= before - len(buckets[category])
                    yield batch
        for category in sorted(buckets):  # end of a finite stream: what is left, padded with negatives
            while buckets[category]:
                batch = self._batch(rng, category, buckets[category], pool, weighted, final=True)
                if batch is None:
                    break
                yield batch

    def _take_positives(self, rng, bucket, weighted):
        count = min(self.num_positives, len(bucket))
        if weighted and len(bucket) > count:
            w = np.array([s['weight'] for s in bucket])
            w = w if w.sum() > 0 else np.ones_like(w)
            keys = np.log(rng.random(len(bucket))) / np.maximum(w, 1e-300)
            chosen = set(np.argsort(-keys)[:count].tolist())
        else:
            chosen = set(range(count))
        taken = [s for i, s in enumerate(bucket) if i in chosen]
        bucket[:] = [s for i, s in enumerate(bucket) if i not in chosen]
        return taken

    def _batch(self, rng, category, bucket, pool, weighted, final=False):
        others = [s for s in pool if s['category'] != category and s['category'] in s['caption']]
        count = min(self.num_positives, len(bucket))
        num_negatives = self.batch_size - count
        if num_negatives and not others:
            if final:
                _logger.warning(f"{len(bucket)} sample(s) of category {category!r} left without negatives to "
                                f"complete a batch (no other category in the stream's recent samples); dropped.")
                bucket.clear()
            return None  # wait for samples of another category
        positives = self._take_positives(rng, bucket, weighted)
        picks = rng.choice(len(others), size=num_negatives, replace=num_negatives > len(others)) \
            if num_negatives else []
        reference = int(rng.integers(self.relevance_max)) if self.relevance_max else -1
        cid = _category_id(category)
        rows = [(s['image'], s['caption'], s['value'], cid) for s in positives]
        for i in picks:
            s = others[int(i)]
            rows.append((s['image'], s['caption'].replace(s['category'], category), 0.0, cid))
        samples = []
        for i in rng.permutation(len(rows)):
            image, caption, target, c = rows[int(i)]
            if reference >= 0:
                caption, target = RankDataset._relative_to(caption, target, reference)
            samples.append((image, self.tokenizer([caption])[0], target, c))
        return collate_rank_batch(samples, with_pairs=self.with_pairs)


def decode_ordinal_samples(src, transform, num_ranks, train, counter=None):
    """Raw tar samples -> (image, label); a bad label or image is skipped and counted."""
    counter = counter or _Counter()
    for sample in src:
        try:
            meta = _meta(sample)
            labels = meta.get('labels') or [meta['value']]
            labels = [int(float(v)) if float(v).is_integer() else math.nan for v in labels]
            if not all(isinstance(v, int) and 0 <= v < num_ranks for v in labels):
                raise ValueError(f"label(s) {labels} are not integers in [0, {num_ranks})")
            label = random.choice(labels) if train else labels[len(labels) // 2]
            with Image.open(io.BytesIO(_image_bytes(sample))) as image:
                tensor = transform(image.convert('RGB'))
        except Exception as err:
            _skip(counter, _key(sample), err)
            continue
        yield tensor, label


# --- shard lists and sizes --------------------------------------------------------------------------

def _expand(urls) -> List[str]:
    return openclip_data('expand_urls')(urls)[0]


def _is_local(url: str) -> bool:
    return not url.startswith('pipe:') and '://' not in url


def check_shards(urls, flag) -> List[str]:
    """The expanded shard list; one clear error for an empty list or missing local shard files."""
    shards = _expand(urls)
    if not shards:
        raise RankDataError(f"{flag} {urls} expands to no shard.")
    missing = [s for s in shards if _is_local(s) and not os.path.isfile(s)]
    if missing:
        from .table import _preview
        raise RankDataError(f"{len(missing)} shard(s) of {flag} {urls} do not exist: {_preview(missing)}.")
    return shards


def first_sample_meta(shard: str):
    """The json of the first sample of a local shard (a cheap format check before training), else None."""
    import tarfile
    if not _is_local(shard):
        return None
    try:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith('.json'):
                    return json.loads(tar.extractfile(member).read())
    except Exception as err:
        raise RankDataError(f"shard {shard} is not a readable tar file ({type(err).__name__}: {err}).")
    raise RankDataError(f"shard {shard} holds no .json sample metadata; convert rank CSVs with "
                        f"python -m open_clip_rank.make_shards.")


def check_shard_data(args, sample_type):
    """Pre-training checks of shard data (before OpenCLIP creates the log folder)."""
    needed = ('value', 'category', 'caption') if sample_type == 'rank' else ('value',)
    for urls, flag in ((args.train_data, '--train-data'), (args.val_data, '--val-data')):
        if not urls:
            continue
        shards = check_shards(urls, flag)
        meta = first_sample_meta(shards[0])
        if meta is not None:
            keys = needed if flag == '--train-data' or sample_type != 'rank' else ('value', 'caption')
            absent = [k for k in keys if k not in meta]
            if absent:
                raise RankDataError(f"{shards[0]}: sample json lacks {absent} (has {sorted(meta)}); {sample_type} "
                                    f"shards need {list(needed)} (python -m open_clip_rank.make_shards writes them).")
    if args.train_data:
        train_num_samples(args)


def train_num_samples(args) -> int:
    if args.train_num_samples is not None:
        return args.train_num_samples
    try:
        size, _ = openclip_data('get_dataset_size')(args.train_data)
    except Exception:
        size = None
    if not size:
        raise RankDataError(f"--train-data {args.train_data}: the number of samples is unknown (no sizes.json "
                            f"beside the shards); pass --train-num-samples.")
    return size


def _shard_source(urls, args, shared_epoch, is_train):
    """OpenCLIP's shard stage: resampled or shuffled-and-split shards, then tar samples (never throwing)."""
    import webdataset as wds
    resampled_shards, detshuffle, tar_samples = openclip_data(
        'ResampledShards2', 'detshuffle2', 'tarfile_to_samples_nothrow')
    if not is_train:
        return [wds.SimpleShardList(urls), wds.split_by_worker, tar_samples]
    if getattr(args, 'dataset_resampled', False):
        stages = [resampled_shards(urls, weights=args.train_data_upsampling_factors, deterministic=True,
                                      epoch=shared_epoch)]
    else:
        num_shards = len(_expand(urls))
        if num_shards < max(1, args.workers) * args.world_size:
            raise RankDataError(f"--train-data has {num_shards} shard(s), fewer than the {max(1, args.workers)} "
                                f"worker(s) x {args.world_size} process(es) reading them; write smaller shards "
                                f"(make_shards --shard-size), lower --workers, or add --dataset-resampled.")
        stages = [wds.SimpleShardList(urls),
                  detshuffle(bufsize=2000, initial=500, seed=args.seed, epoch=shared_epoch),
                  wds.split_by_node, wds.split_by_worker]
    return [*stages, tar_samples,
            detshuffle(bufsize=SAMPLE_SHUFFLE[0], initial=SAMPLE_SHUFFLE[1], seed=args.seed + args.rank,
                           epoch=shared_epoch)]


class _EpochOfBatches(torch.utils.data.IterableDataset):
    """Exactly ``per_worker`` batches from each worker per epoch: the pipeline is read again from its start
    when a finite (not resampled) stream ends early, so every process runs the same number of steps (DDP
    would hang otherwise). Ends early only if a whole pass yields nothing (every sample unreadable)."""

    def __init__(self, pipeline, per_worker):
        super().__init__()
        self.pipeline, self.per_worker = pipeline, per_worker

    def __iter__(self):
        count = 0
        while count < self.per_worker:
            before = count
            for batch in self.pipeline:
                yield batch
                count += 1
                if count >= self.per_worker:
                    return
            if count == before:
                _logger.error("A pass over this worker's shards gave no batch (every sample unreadable?); "
                              "the epoch ends early.")
                return


def _train_loader(pipeline, args, num_samples):
    """OpenCLIP's epoch arithmetic (whole batches per worker) and its ``WebLoader``."""
    import webdataset as wds
    global_batch = args.batch_size * args.world_size
    workers = max(1, args.workers)
    per_worker = max(1, math.ceil(math.ceil(num_samples / global_batch) / workers))
    num_batches = per_worker * workers
    dataset = _EpochOfBatches(wds.DataPipeline(*pipeline), per_worker)
    loader = wds.WebLoader(dataset, batch_size=None, shuffle=False, num_workers=args.workers,
                           persistent_workers=args.workers > 0)
    loader.num_batches = num_batches
    loader.num_samples = num_batches * global_batch
    return loader


def scan_categories(urls, sample_type='rank') -> ShardCategories:
    """Category names (sorted) and sample count of validation shards, from their json only."""
    import webdataset as wds
    names, count = set(), 0
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), openclip_data('tarfile_to_samples_nothrow')):
        try:
            meta = _meta(sample)
        except Exception:
            continue
        count += 1
        names.add(str(meta.get('category', 'all')))
    return ShardCategories(sorted(names), str(urls), count, sample_type)


def _val_rank_samples(src, transform, tokenizer, index, counter):
    for s in decode_rank_samples(src, transform, counter, require_category=False):
        yield s['image'], tokenizer([s['caption']])[0], s['value'], index.get(s['category'], 0)


def get_rank_shard_data(args, train_transform, val_transform, tokenizer, epoch, with_pairs):
    import functools
    import webdataset as wds
    DataInfo, SharedEpoch = openclip_data('DataInfo', 'SharedEpoch')
    from .loaders import RankDataInfo
    data = {}
    if args.train_data:
        if not 0 < int(args.batch_size * (1 - args.negative_ratio)):
            raise RankDataError(f"--batch-size {args.batch_size} with --negative-ratio {args.negative_ratio} leaves "
                                f"no positives per batch.")
        check_shards(args.train_data, '--train-data')
        num_samples = train_num_samples(args)
        shared_epoch = SharedEpoch(epoch)
        relevance_max = args.relevance_max_score if getattr(args, 'train_with_relevance_score', False) else 0
        buckets = RankBuckets(args.batch_size, args.negative_ratio, tokenizer, seed=args.seed,
                              shared_epoch=shared_epoch, rank=args.rank, with_pairs=with_pairs,
                              relevance_max=relevance_max)
        pipeline = [*_shard_source(args.train_data, args, shared_epoch, True),
                    functools.partial(decode_rank_samples, transform=train_transform), buckets]
        loader = _train_loader(pipeline, args, num_samples)
        data['train'] = DataInfo(loader, shared_epoch=shared_epoch)
        _logger.info(f"Rank training data from shards: {num_samples} samples, {loader.num_batches} batches of "
                     f"{args.batch_size} per process per epoch ({args.batch_size - buckets.num_positives} "
                     f"negatives per batch; per-category streaming buckets).")
    if args.val_data:
        check_shards(args.val_data, '--val-data')
        table = scan_categories(args.val_data)
        index = {name: i for i, name in enumerate(table.category_names)}
        pipeline = [*_shard_source(args.val_data, args, None, False),
                    functools.partial(_val_rank_samples, transform=val_transform, tokenizer=tokenizer, index=index,
                                      counter=_Counter(where='validation')),
                    wds.batched(args.batch_size, partial=True,
                                collation_fn=functools.partial(collate_rank_batch, with_pairs=False))]
        data['val'] = RankDataInfo(_val_loader(pipeline, args, table.num_samples), table=table)
    return data


def _val_loader(pipeline, args, num_samples):
    import webdataset as wds
    loader = wds.WebLoader(wds.DataPipeline(*pipeline), batch_size=None, shuffle=False, num_workers=args.workers)
    loader.num_samples = num_samples
    loader.num_batches = math.ceil(num_samples / args.batch_size)
    return loader


def get_ordinal_shard_data(args, train_transform, val_transform, num_ranks, epoch):
    import functools
    import webdataset as wds
    DataInfo, SharedEpoch = openclip_data('DataInfo', 'SharedEpoch')
    from .loaders import RankDataInfo
    from .ordinal import collate_ordinal_batch
    data = {}
    if args.train_data:
        check_shards(args.train_data, '--train-data')
        num_samples = train_num_samples(args)
        shared_epoch = SharedEpoch(epoch)
        pipeline = [*_shard_source(args.train_data, args, shared_epoch, True),
                    functools.partial(decode_ordinal_samples, transform=train_transform, num_ranks=num_ranks,
                                      train=True),
                    wds.batched(args.batch_size, partial=False, collation_fn=collate_ordinal_batch)]
        loader = _train_loader(pipeline, args, num_samples)
        data['train'] = DataInfo(loader, shared_epoch=shared_epoch)
        _logger.info(f"Ordinal training data from shards: {num_samples} samples, {num_ranks} ranks, "
                     f"{loader.num_batches} batches of {args.batch_size} per process per epoch.")
    if args.val_data:
        check_shards(args.val_data, '--val-data')
        info = scan_categories(args.val_data, 'ordinal')
        info.num_ranks = num_ranks
        pipeline = [*_shard_source(args.val_data, args, None, False),
                    functools.partial(decode_ordinal_samples, transform=val_transform, num_ranks=num_ranks,
                                      train=False, counter=_Counter(where='validation')),
                    wds.batched(args.batch_size, partial=True, collation_fn=collate_ordinal_batch)]
        data['val'] = RankDataInfo(_val_loader(pipeline, args, info.num_samples), table=info, sample_type='ordinal')
    return data
