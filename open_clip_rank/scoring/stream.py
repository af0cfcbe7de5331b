"""Decoding off the main process: a torch ``IterableDataset`` that turns partitions into ready batches.

Each DataLoader worker takes whole partitions (worker w: partitions w, w + num_workers, ...), decodes and
transforms their images and yields batches of at most ``batch_size`` images; a partition's last batch is marked
``final`` and carries the partition's skipped samples (unreadable image, damaged json, a tar that breaks off), so
the main process knows when a partition is complete and can write it. Batches are built here, not by the
DataLoader's collation (``batch_size=None``), so a batch never mixes partitions and pinned memory applies to the
image tensor. Nothing here touches the model: the main process only moves tensors and runs the towers.
"""
import logging
from typing import List, Optional

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..data.shards import image_bytes, sample_meta
from ..files.images import open_rgb
from .partitions import Partition

_logger = logging.getLogger(__name__)


class _ShardErrors:
    """webdataset's exception handler: a broken tar or member is recorded (and the rest of the shard read)."""

    def __init__(self):
        self.errors = []

    def __call__(self, err) -> bool:
        self.errors.append(f'{type(err).__name__}: {err}')
        return True


def _reason(err) -> str:
    return f'{type(err).__name__}: {err}'


class PartitionStream(IterableDataset):
    """Batches ``{'partition', 'images' [B, 3, H, W] or None, 'rows' [B dicts], 'final', 'skipped'}``."""

    def __init__(self, partitions: List[Partition], transform, batch_size: int, prompt_key: Optional[str] = None,
                 image_key: Optional[str] = None, extra_keys=(), truth_keys=None, load_truncated: bool = False):
        self.partitions = partitions
        self.transform = transform
        self.batch_size = batch_size
        self.prompt_key = prompt_key    # a shard json key holding each sample's own instruction
        self.image_key = image_key      # a shard entry holding the image (default: the first of jpg/jpeg/png/webp)
        self.extra_keys = tuple(extra_keys)  # shard json keys copied into the output (uid, url, ...)
        self.truth_keys = dict(truth_keys or {})  # output column ('target', 'category') -> shard json key
        self.load_truncated = load_truncated

    def __iter__(self):
        worker = get_worker_info()
        mine = self.partitions if worker is None else self.partitions[worker.id::worker.num_workers]
        for partition in mine:
            yield from self._batches(partition)

    # --- one partition ---------------------------------------------------------------------------------

    def _batches(self, partition: Partition):
        tensors, rows, skipped = [], [], []
        for row, image in self._decoded(partition, skipped):
            tensors.append(image)
            rows.append(row)
            if len(rows) == self.batch_size:
                yield self._batch(partition, tensors, rows, final=False, skipped=[])
                tensors, rows = [], []
        yield self._batch(partition, tensors, rows, final=True, skipped=skipped)

    @staticmethod
    def _batch(partition, tensors, rows, final, skipped):
        return {'partition': partition.name, 'source': partition.source, 'images': torch.stack(tensors) if tensors
                else None, 'rows': rows, 'final': final, 'skipped': skipped}

    def _decoded(self, partition, skipped):
        samples = self._shard_samples(partition, skipped) if partition.is_shard else self._file_samples(partition)
        for row, source in samples:
            try:
                image = self.transform(open_rgb(source, load_truncated=self.load_truncated))
            except Exception as err:  # noqa: BLE001 - any decode failure: listed, never scored, never a crash
                skipped.append({**row, 'reason': _reason(err)})
                continue
            yield row, image

    def _file_samples(self, partition):
        for item in partition.items:
            yield dict(item), item['path']

    def _shard_samples(self, partition, skipped):
        from webdataset.tariterators import tarfile_samples
        errors = _ShardErrors()
        count = 0
        for sample in tarfile_samples([{'url': partition.url}], handler=errors):
            count += 1
            row = {'key': sample.get('__key__', f'#{count}'), 'url': partition.url}
            try:
                row.update(self._json_fields(sample))
                data = sample[self.image_key] if self.image_key else image_bytes(sample)
            except Exception as err:  # noqa: BLE001 - a damaged json, no image entry: listed and skipped
                skipped.append({**row, 'reason': _reason(err)})
                continue
            yield row, data
        for error in errors.errors:  # e.g. a tar cut short: what followed it is lost, and said so
            skipped.append({'key': None, 'url': partition.url, 'reason': f'shard read error: {error}'})

    def _json_fields(self, sample) -> dict:
        if not self.prompt_key and not self.extra_keys and not self.truth_keys:
            return {}
        if 'json' not in sample:
            raise ValueError('no .json in the sample (needed for ' + ', '.join(
                k for k in (self.prompt_key, *self.extra_keys, *self.truth_keys.values()) if k) + ')')
        meta = sample_meta(sample)
        out = {k: meta[k] for k in self.extra_keys if k in meta}
        out.update({column: meta[key] for column, key in self.truth_keys.items() if key in meta})
        if self.prompt_key:
            prompt = meta.get(self.prompt_key)
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"its .json has no instruction under '{self.prompt_key}'")
            out['prompt'] = prompt
        return out
