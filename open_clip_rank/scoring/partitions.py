"""The units of a scoring run: one partition per webdataset shard, or per fixed-size chunk of a folder or CSV.

A partition is what one output file holds and what a rerun skips when its file exists. The list is a pure function
of the inputs (shard URLs in their expanded order; files sorted; CSV rows in file order), so every process of a
``torchrun`` launch computes the same list and takes every ``world_size``-th partition from its own rank: no
coordination, no duplicates, and one process is exactly the single-process run. A shard's partition is named by its
URL; a chunk's by its position, so the folder's identity records what was chunked (``items_digest``) and how
(``--partition-size``).
"""
import hashlib
import os
from dataclasses import dataclass, field
from typing import List, Optional

DEFAULT_PARTITION_SIZE = 10_000


@dataclass
class Partition:
    name: str                 # the output file's stem: shard-<basename>-<url hash>, files-<index>, rows-<index>
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


def shard_name(url: str) -> str:
    """``shard-<basename>-<hash of the whole URL>``: the same shard has the same name in any list (shards appended to
    the list, or the list reordered, reuse the finished ones), two shards sharing a basename never do."""
    return f'shard-{_stem(url)}-{hashlib.sha1(url.encode()).hexdigest()[:10]}'


def shard_partitions(urls: List[str]) -> List[Partition]:
    """One partition per shard, in the list's order."""
    return [Partition(shard_name(url), url, url=url) for url in urls]


def items_digest(items: List[dict]) -> str:
    """What a folder's or CSV's chunks are made of (every key, in order): a rerun must chunk the same items."""
    digest = hashlib.sha1()
    for item in items:
        digest.update(str(item['key']).encode() + b'\0' + str(item.get('prompt', '')).encode() + b'\n')
    return digest.hexdigest()


def chunk_partitions(items: List[dict], source: str, prefix: str, size: int) -> List[Partition]:
    """Fixed-size chunks of a folder's files or a CSV's rows, in order."""
    if size < 1:
        raise ValueError(f"--partition-size must be at least 1, got {size}.")
    return [Partition(f'{prefix}-{i // size:06d}', source, items=items[i:i + size])
            for i in range(0, len(items), size)]


def for_process(partitions: List[Partition], rank: int, world_size: int) -> List[Partition]:
    """This process's share: partitions rank, rank + world_size, ... (deterministic, disjoint, complete)."""
    return partitions[rank::world_size]
