"""Sample-type data streamed from webdataset shards (``--dataset-type webdataset``): the plumbing every sample
type shares.

Shard layout (what ``python -m open_clip_rank.make_shards`` writes): per sample ``<key>.jpg|png|jpeg|webp``
plus ``<key>.json`` holding the fields the sample type declares (``SampleType.shard_fields``).

Training streams shards as OpenCLIP's own webdataset path does (its ``ResampledShards2`` / ``detshuffle2``,
``split_by_node`` / ``split_by_worker``, ``tarfile_to_samples_nothrow``, ``--train-num-samples`` or
``sizes.json``, its batches-per-worker arithmetic; a finite stream that ends early is read again, so every
process runs the same number of steps). Each sample type decodes and batches the stream in its own module
(``rank_shards.py``, ``ordinal.py``). Unreadable samples are skipped and counted in the log.
"""
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import List

import torch

from ..files.images import SHARD_IMAGE_KEYS
from ..integration.compat import openclip_data
from .table import RankDataError, preview

_logger = logging.getLogger(__name__)

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
    sample_type: str = ''
    num_ranks: int = 0  # sample types with a fixed set of ranks


@dataclass
class SkipCounter:
    skipped: int = 0
    where: str = 'this data worker'


def skip_sample(counter, key, err):
    counter.skipped += 1
    _logger.warning(f"Skipping unreadable sample {key} ({type(err).__name__}: {err}); "
                    f"{counter.skipped} skipped so far in {counter.where}.")


def image_bytes(sample):
    for ext in SHARD_IMAGE_KEYS:
        if ext in sample:
            return sample[ext]
    raise ValueError(f"no image ({'/'.join(SHARD_IMAGE_KEYS)}) in the sample")


def sample_meta(sample) -> dict:
    if 'json' not in sample:
        raise ValueError('no .json in the sample')
    meta = json.loads(sample['json'])
    if not isinstance(meta, dict):
        raise ValueError('its .json is not an object')
    return meta


def sample_key(sample):
    """'<key> in <shard>', plus the image file it was made from when its json names it (``make_shards`` writes
    ``source_path``)."""
    where = f"{sample.get('__key__', '?')} in {sample.get('__url__', '?')}"
    try:
        source = json.loads(sample['json']).get('source_path')
    except Exception:  # noqa: BLE001 - no json, or a damaged one: the key and shard alone
        source = None
    return f"{where} (from {source})" if source else where


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
        raise RankDataError(f"{len(missing)} shard(s) of {flag} {urls} do not exist: {preview(missing)}.")
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
    """Pre-training checks of ``sample_type``'s shard data (a ``registry.SampleType``), before OpenCLIP creates
    the log folder: the shards exist, and the first local sample's json holds the declared fields."""
    for urls, flag in ((args.train_data, '--train-data'), (args.val_data, '--val-data')):
        if not urls:
            continue
        shards = check_shards(urls, flag)
        meta = first_sample_meta(shards[0])
        if meta is not None:
            needed = sample_type.shard_fields if flag == '--train-data' else sample_type.val_shard_fields
            absent = [k for k in needed if k not in meta]
            if absent:
                raise RankDataError(f"{shards[0]}: sample json lacks {absent} (has {sorted(meta)}); {sample_type.name} "
                                    f"shards need {list(sample_type.shard_fields)} (python -m open_clip_rank.make_shards "
                                    f"writes them).")
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


def shard_source(urls, args, shared_epoch, is_train):
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


def train_loader(pipeline, args, num_samples):
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


def scan_categories(urls, sample_type: str) -> ShardCategories:
    """Category names (sorted) and sample count of validation shards, from their json only."""
    import webdataset as wds
    names, count = set(), 0
    for sample in wds.DataPipeline(wds.SimpleShardList(urls), openclip_data('tarfile_to_samples_nothrow')):
        try:
            meta = sample_meta(sample)
        except Exception:
            continue
        count += 1
        names.add(str(meta.get('category', 'all')))
    return ShardCategories(sorted(names), str(urls), count, sample_type)


def val_loader(pipeline, args, num_samples):
    import webdataset as wds
    loader = wds.WebLoader(wds.DataPipeline(*pipeline), batch_size=None, shuffle=False, num_workers=args.workers)
    loader.num_samples = num_samples
    loader.num_batches = math.ceil(num_samples / args.batch_size)
    return loader


