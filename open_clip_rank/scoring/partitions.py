"""The units of a scoring run: one partition per webdataset shard, or per fixed-size chunk of a folder or CSV.

A partition is what one output file holds and what a rerun skips when its file exists. The list is a pure function
of the inputs (shard URLs in their expanded order; files sorted; CSV rows in file order), so every process of a
``torchrun`` launch computes the same list and takes every ``world_size``-th partition from its own rank: no
coordination, no duplicates, and one process is exactly the single-process run.
"""
import os
from dataclasses import dataclass, field
from typing import List, Optional

DEFAULT_PARTITION_SIZE = 10_000


@dataclass
class Partition:
    name: str                 # the output file's stem: shard-<index>-<basename>, files-<index>, rows-<index>
    source: str               # the shard URL, or the folder / CSV the items come from
    url: Optional[str] = None  # a webdataset shard: its samples are read from here
    items: List[dict] = field(default_factory=list)  # a folder / CSV chunk: {'key', 'path', 'prompt', ...}

    @property
    def is_shard(self) -> bool:
        return self.url is not None


def _stem(url: str) -> str:
    base = os.path.basename(url.rstrip('/').split('::')[0]) or 'shard'
    for suffix in ('.tar.gz', '.tgz', '.tar'):
        if base.endswith(suffix):
            base = base[:-len(suffix)]
    return ''.join(c if c.isalnum() or c in '-_.' else '_' for c in base)[:80]


def shard_partitions(urls: List[str]) -> List[Partition]:
    """One partition per shard; the index keeps names unique when two shards share a basename."""
    return [Partition(f'shard-{i:06d}-{_stem(url)}', url, url=url) for i, url in enumerate(urls)]


def chunk_partitions(items: List[dict], source: str, prefix: str, size: int) -> List[Partition]:
    """Fixed-size chunks of a folder's files or a CSV's rows, in order."""
    if size < 1:
        raise ValueError(f"--partition-size must be at least 1, got {size}.")
    return [Partition(f'{prefix}-{i // size:06d}', source, items=items[i:i + size])
            for i in range(0, len(items), size)]


def for_process(partitions: List[Partition], rank: int, world_size: int) -> List[Partition]:
    """This process's share: partitions rank, rank + world_size, ... (deterministic, disjoint, complete)."""
    return partitions[rank::world_size]
