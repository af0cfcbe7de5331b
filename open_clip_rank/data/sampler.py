"""The rank batch sampler: one category (instruction) per batch, a pure function of (seed, epoch, rank).

Deterministic, different across ranks and epochs, and independent of ``--workers`` (the official
code kept a counter inside ``__getitem__`` and relied on each worker fetching whole batches).
"""
from typing import NamedTuple

import numpy as np

from .table import RankDataError, RankTable


class FixedEpoch(NamedTuple):
    """Stands in for OpenCLIP's ``SharedEpoch`` (anything with ``get_value()``) outside its loop."""
    value: int

    def get_value(self) -> int:
        return self.value


class RankBatchSampler:
    """Yields batches of (row, batch_category) keys; batch_category is -1 for positives. With ``relevance_max``
    each batch draws a reference value from 0..max-1 and its keys are (row, batch_category, reference).

    Per batch (as the official sampler): a category drawn uniformly; ``n_pos = min(int(B * (1 - ratio)), n)``
    positives drawn from it without replacement, with probability proportional to the weight column
    when there is one. A category with fewer rows than ``n_pos`` contributes all its rows and the rest
    of the batch is negatives, so every batch has exactly ``batch_size`` samples. Negatives are drawn
    from the other categories only (the original could draw them from the same category and label them 0).

    The global plan of ``len(table) // (batch_size * world_size) * world_size`` batches depends only on
    (seed, epoch); rank r takes batches r, r + world_size, ...

    ``global_pairs`` (``--rank-global-pairs``): the plan is instead ``len(table) // (batch_size * world_size)``
    global batches of ``batch_size * world_size`` rows, each of ONE category (positives and negatives drawn
    as above at the global size), and rank r takes rows ``[r * batch_size, (r + 1) * batch_size)`` of each:
    every rank sees the same category (and reference value) at every step, so pairs can be formed across
    ranks. With ``world_size`` 1 it is the default plan.
    """

    def __init__(self, table: RankTable, batch_size: int, negative_ratio: float = 0.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shared_epoch=None, relevance_max: int = 0,
                 global_pairs: bool = False):
        if batch_size < 2:
            raise RankDataError(f"rank sampling needs --batch-size >= 2 (pairs within a batch), got {batch_size}.")
        self.table = table
        self.batch_size = batch_size
        self.num_positives = int(batch_size * (1 - negative_ratio))  # the official count (int, not round)
        self.num_negatives = batch_size - self.num_positives
        self.relevance_max = relevance_max
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.global_pairs = bool(global_pairs)
        if self.global_pairs:  # the whole step's batch is drawn at once, then sliced per rank
            self.num_positives = int(batch_size * world_size * (1 - negative_ratio))
            self.num_negatives = batch_size * world_size - self.num_positives
        self.shared_epoch = shared_epoch or FixedEpoch(0)
        self.rows = [table.rows_of(c) for c in range(len(table.category_names))]
        self.num_batches = len(table) // (batch_size * world_size)
        if self.num_batches == 0:
            raise RankDataError(
                f"{table.source} has {len(table)} rows, fewer than one batch per process "
                f"(--batch-size {batch_size} x {world_size} process(es)); lower --batch-size or add data.")
        if self.num_negatives and len(self.rows) < 2:
            raise RankDataError(
                f"--negative-ratio {negative_ratio} needs images of at least two categories to draw negatives from, "
                f"but {table.source} has one ({table.category_names[0]!r}); use --negative-ratio 0.")

    def __len__(self):
        return self.num_batches

    def _positives(self, rng, category, count):
        rows = self.rows[category]
        if self.table.weights is None:
            return rng.choice(rows, size=count, replace=False)
        w = self.table.weights[rows]
        if w.sum() <= 0:
            w = np.ones_like(w)
        # weighted sampling without replacement (Efraimidis-Spirakis keys); zero weights come last
        keys = np.log(rng.random(len(rows))) / np.maximum(w, 1e-300)
        return rows[np.argsort(-keys)[:count]]

    def _negatives(self, rng, category, count):
        others = np.flatnonzero(self.table.category_ids != category)
        return rng.choice(others, size=count, replace=count > len(others))

    def plan(self, epoch: int):
        """All batches of this rank for ``epoch``, as lists of (row, batch_category) keys."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        if self.global_pairs:  # num_batches global batches of batch_size * world_size rows
            size, count = self.batch_size * self.world_size, self.num_batches
        else:  # num_batches * world_size batches of batch_size rows
            size, count = self.batch_size, self.num_batches * self.world_size
        for _ in range(count):
            category = int(rng.integers(len(self.rows)))
            n_pos = min(self.num_positives, len(self.rows[category]))
            positives = self._positives(rng, category, n_pos)
            negatives = self._negatives(rng, category, size - n_pos)
            reference = int(rng.integers(self.relevance_max)) if self.relevance_max else -1
            keys = [(int(r), -1) for r in positives] + [(int(r), category) for r in negatives]
            if reference >= 0:
                keys = [key + (reference,) for key in keys]
            order = rng.permutation(len(keys))
            batches.append([keys[i] for i in order])
        if self.global_pairs:
            start = self.rank * self.batch_size
            return [batch[start:start + self.batch_size] for batch in batches]
        return batches[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.plan(self.shared_epoch.get_value()))
