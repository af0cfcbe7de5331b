"""Rank training samples for ``--rank-feature-cache`` (see ``feature_cache.py``): the cached tower output of an
image's view when the cache has it, both views' pixels when it does not; captions, targets and categories exactly
as ``RankDataset`` (negatives re-worded, the text side always computed)."""
from typing import NamedTuple

import torch

from .feature_cache import CachedImages, open_cache
from .batches import RankTexts
from .dataset import RankDataset


class _Hit(NamedTuple):
    entry: int
    view: int
    tokens: torch.Tensor  # [*shape], storage dtype


class _Miss(NamedTuple):
    entry: int
    view: int
    pixels: torch.Tensor  # [2, C, H, W]: no flip, flip


class CachedRankDataset(RankDataset):
    """``RankDataset`` whose images come from the cache. ``transform`` must be the deterministic (no-flip) train
    transform; the view is drawn here as ``RandomHorizontalFlip(p=0.5)`` would (``torch.rand``), so data workers'
    seeding gives the same randomness as the uncached path."""

    def __init__(self, table, transform, tokenizer, cache_path: str):
        super().__init__(table, transform, tokenizer, replace_unreadable=True)
        self.cache_path = cache_path

    def _load_image(self, row):
        view = int(torch.rand(1).item() < 0.5)
        tokens = open_cache(self.cache_path, writable=False).read(row, view)
        if tokens is not None:
            return _Hit(row, view, tokens)
        pixels = super()._load_image(row)
        if pixels is None:
            return None
        return _Miss(row, view, torch.stack([pixels, pixels.flip(-1)]))


def collate_cached_rank_batch(samples, cache_path: str, with_pairs: bool = True, global_pairs: bool = False):
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    images, tokens, targets, categories = zip(*samples)
    hits = [i for i in images if isinstance(i, _Hit)]
    misses = [i for i in images if isinstance(i, _Miss)]
    pixels = torch.stack([m.pixels for m in misses]) if misses else torch.zeros(0)
    cached = torch.stack([h.tokens for h in hits]) if hits else torch.zeros(0)
    batch = CachedImages(
        pixels=pixels, tokens=cached,
        hit=torch.tensor([isinstance(i, _Hit) for i in images], dtype=torch.bool),
        entries=torch.tensor([i.entry for i in images], dtype=torch.long),
        views=torch.tensor([i.view for i in images], dtype=torch.long),
        cache_path=cache_path)
    return batch, RankTexts(
        torch.stack(tokens), torch.tensor(targets, dtype=torch.float32), torch.tensor(categories, dtype=torch.long),
        with_pairs, global_pairs)
