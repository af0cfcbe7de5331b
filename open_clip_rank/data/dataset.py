"""Rank samples: an image, its (possibly re-worded) instruction, its target; batched into ``RankTexts``.

A negative sample (an image of another category in a category's batch) gets the batch's category
word in its caption, in place of its own (whole words only), and target 0 ("Rank the numbers of horse" on an
image with no horse).
"""
import logging

import numpy as np
import torch
from torch.utils.data import Dataset

from ..files.images import open_rgb
from ..integration.run_state import run_flag
from .batches import RankTexts
from .table import NEGATIVE_TARGET, RankTable, swap_category

_logger = logging.getLogger(__name__)


def truncated_images_allowed() -> bool:
    """``--load-truncated-images`` of the training run (False outside one). A dataset reads it when it is built,
    in the main process, and carries it into its data workers (forked or spawned alike)."""
    return bool(run_flag('load_truncated_images'))


def load_image_or_skip(dataset, path, transform):
    """The transformed image (decoded by ``files/images.py:open_rgb``), or None for an unreadable or truncated
    file (a truncated one decodes when ``dataset.load_truncated_images``): skipped, counted on
    ``dataset.num_skipped`` and logged, so training keeps going."""
    try:
        return transform(open_rgb(path, load_truncated=getattr(dataset, 'load_truncated_images', False)))
    except Exception as err:
        dataset.num_skipped += 1
        _logger.warning(f"Skipping unreadable image {path} ({type(err).__name__}: {err}); "
                        f"{dataset.num_skipped} skipped so far in this data worker.")
        return None


def first_readable(load, candidates):
    """(candidate, image) of the first candidate whose image reads; (None, None) when none does."""
    for candidate in candidates:
        image = load(candidate)
        if image is not None:
            return candidate, image
    return None, None


class RankDataset(Dataset):
    """Map-style dataset indexed by (row, batch_category) keys or plain row numbers.

    An image that cannot be read is skipped and logged with a running count. In training the next
    row of the same category takes its place so every batch keeps its size; in evaluation it is
    left out of the metrics.
    """

    def __init__(self, table: RankTable, transform, tokenizer, replace_unreadable: bool = True):
        self.table = table
        self.transform = transform
        self.tokenize = tokenizer
        self.replace_unreadable = replace_unreadable
        self.num_skipped = 0
        self.load_truncated_images = truncated_images_allowed()

    def __len__(self):
        return len(self.table)

    def _caption(self, row, batch_category):
        caption = self.table.captions[row]
        if batch_category < 0:
            return caption, float(self.table.values[row]), int(self.table.category_ids[row])
        own = self.table.category_names[self.table.category_ids[row]]
        return swap_category(caption, own, self.table.category_names[batch_category]), NEGATIVE_TARGET, batch_category

    @staticmethod
    def _relative_to(caption, target, reference):
        """The official ``--train-with-relevance-score``: rank by closeness to the batch's reference value."""
        return f"{caption.replace('.', '')} by the relevance count to {reference}.", abs(target - reference)

    def _load_image(self, row):
        return load_image_or_skip(self, self.table.paths[row], self.transform)

    def _candidates(self, row):
        """The row, then (in training) the other rows of its category, in order after it."""
        yield row
        if self.replace_unreadable:
            same = self.table.rows_of(self.table.category_ids[row])
            start = int(np.searchsorted(same, row))
            for step in range(1, len(same)):
                yield int(same[(start + step) % len(same)])

    def __getitem__(self, key):
        row, batch_category, *relevance = key if isinstance(key, tuple) else (key, -1)
        reference = relevance[0] if relevance else -1
        row, image = first_readable(self._load_image, self._candidates(row))
        if image is None:
            return None
        caption, target, category = self._caption(row, batch_category)
        if reference >= 0:
            caption, target = self._relative_to(caption, target, reference)
        return image, self.tokenize([caption])[0], target, category


def collate_rank_batch(samples, with_pairs: bool = True, global_pairs: bool = False):
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    images, tokens, targets, categories = zip(*samples)
    return torch.stack(images), RankTexts(
        torch.stack(tokens), torch.tensor(targets, dtype=torch.float32), torch.tensor(categories, dtype=torch.long),
        with_pairs, global_pairs)
