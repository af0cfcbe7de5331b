"""The 'rank' sample type streamed from webdataset shards: per-category buckets of decoded samples.

Each sample's json holds ``value``, ``category``, ``caption`` and an optional ``weight``. Decoded samples are
bucketed per category (``RankBuckets``): a bucket that holds a batch's positives leaves as one rank batch,
completed with ``--negative-ratio`` negatives drawn from a pool of recent samples of other categories (their
caption re-worded to the batch's category, target 0, as the CSV path). Categories therefore reach batches in
proportion to their share of the stream, not uniformly as the CSV sampler draws them. The stream itself is
OpenCLIP's (``shards.py``).
"""
import functools
import logging
import math
import zlib
from collections import deque

import numpy as np

from ..files.images import open_rgb
from .dataset import RankDataset, collate_rank_batch
from .shards import (SkipCounter, check_shards, image_bytes, sample_key, sample_meta, scan_categories, shard_source,
                     skip_sample, train_loader, train_num_samples, val_loader)
from .table import NEGATIVE_TARGET, RankDataError, has_category_word, swap_category

_logger = logging.getLogger(__name__)

POOL_BATCHES = 4  # the negatives pool holds this many batches' worth of recent samples
MAX_BUFFERED_BATCHES = 32  # buckets beyond this many batches of samples: the fullest leaves early


def category_id(name: str) -> int:
    """A stable id for a category seen in a stream (training ids are not used for metrics)."""
    return zlib.crc32(name.encode()) & 0x7fffffff


def decode_rank_samples(src, transform, counter=None, require_category=True, load_truncated=False):
    """Raw tar samples -> dicts (image tensor, caption, value, category, weight); bad ones skipped, counted.
    ``load_truncated``: decode truncated images (``--load-truncated-images``) instead of skipping them."""
    counter = counter or SkipCounter()
    for sample in src:
        try:
            meta = sample_meta(sample)
            value = float(meta['value'])
            if not math.isfinite(value):
                raise ValueError(f"value {meta['value']!r} is not finite")
            caption = str(meta['caption'])
            category = str(meta['category']).strip() if require_category or 'category' in meta else 'all'
            if not caption.strip() or not category:
                raise ValueError(f"empty {'caption' if not caption.strip() else 'category'} in its json")
            weight = float(meta.get('weight', 1.0))
            tensor = transform(open_rgb(image_bytes(sample), load_truncated=load_truncated))
        except Exception as err:  # unreadable image, bad json, missing key: skip, count, keep going
            skip_sample(counter, sample_key(sample), err)
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
        others = [s for s in pool if s['category'] != category and has_category_word(s['caption'], s['category'])]
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
        cid = category_id(category)
        rows = [(s['image'], s['caption'], s['value'], cid) for s in positives]
        for i in picks:
            s = others[int(i)]
            rows.append((s['image'], swap_category(s['caption'], s['category'], category), NEGATIVE_TARGET, cid))
        samples = []
        for i in rng.permutation(len(rows)):
            image, caption, target, c = rows[int(i)]
            if reference >= 0:
                caption, target = RankDataset._relative_to(caption, target, reference)
            samples.append((image, self.tokenizer([caption])[0], target, c))
        return collate_rank_batch(samples, with_pairs=self.with_pairs)


def _val_rank_samples(src, transform, tokenizer, index, counter, load_truncated=False):
    for s in decode_rank_samples(src, transform, counter, require_category=False, load_truncated=load_truncated):
        yield s['image'], tokenizer([s['caption']])[0], s['value'], index.get(s['category'], 0)


def get_rank_shard_data(args, train_transform, val_transform, tokenizer, epoch, with_pairs):
    import webdataset as wds
    from .loaders import DataInfo, RankDataInfo, SharedEpoch
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
        pipeline = [*shard_source(args.train_data, args, shared_epoch, True),
                    functools.partial(decode_rank_samples, transform=train_transform,
                                      load_truncated=getattr(args, 'load_truncated_images', False)), buckets]
        loader = train_loader(pipeline, args, num_samples)
        data['train'] = DataInfo(loader, shared_epoch=shared_epoch)
        _logger.info(f"Rank training data from shards: {num_samples} samples, {loader.num_batches} batches of "
                     f"{args.batch_size} per process per epoch ({args.batch_size - buckets.num_positives} "
                     f"negatives per batch; per-category streaming buckets).")
    if args.val_data:
        check_shards(args.val_data, '--val-data')
        table = scan_categories(args.val_data, 'rank')
        index = {name: i for i, name in enumerate(table.category_names)}
        pipeline = [*shard_source(args.val_data, args, None, False),
                    functools.partial(_val_rank_samples, transform=val_transform, tokenizer=tokenizer, index=index,
                                      counter=SkipCounter(where='validation'),
                                      load_truncated=getattr(args, 'load_truncated_images', False)),
                    wds.batched(args.batch_size, partial=True,
                                collation_fn=functools.partial(collate_rank_batch, with_pairs=False))]
        data['val'] = RankDataInfo(val_loader(pipeline, args, table.num_samples), table=table, sample_type='rank')
    return data
