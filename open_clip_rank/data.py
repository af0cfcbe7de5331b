"""Rank-sampling CSV data (``--dataset-type csv --csv-dataset-sample-type rank``).

CSV rows: image path, instruction (title), category word, target value[, sampling weight]. A train
batch is one instruction: positives of one category plus a ``--negative-ratio`` share of images
from other categories whose caption gets the batch's category word and target 0 ("Rank the numbers
of horse" on an image with no horse). Batches come from ``RankBatchSampler``, a batch sampler that
is a pure function of (seed, epoch, rank): deterministic, different across ranks and epochs, and
independent of ``--workers`` (the official code kept a counter inside ``__getitem__`` instead).

Targets travel to the model inside ``RankTexts`` (tokens + targets), which OpenCLIP's training loop
moves with ``texts.to(device)`` like a token tensor.
"""
import functools
import logging
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from PIL import Image
from torch.utils.data import BatchSampler, DataLoader, Dataset, SequentialSampler
from torchvision import transforms as T

from open_clip_train.data import DataInfo, SharedEpoch

from .rank_batch import RankTexts

_logger = logging.getLogger(__name__)


class RankDataError(ValueError):
    """Bad rank data, found before training starts."""


# --- the table ---------------------------------------------------------------------------------

@dataclass
class RankTable:
    paths: List[str]
    captions: List[str]
    category_ids: np.ndarray  # [rows] int
    category_names: List[str]  # sorted
    values: Optional[np.ndarray]  # [rows] float; None for inference CSVs without ground truth
    weights: Optional[np.ndarray]  # [rows] float or None
    source: str

    def __len__(self):
        return len(self.paths)

    def rows_of(self, category_id: int) -> np.ndarray:
        return np.flatnonzero(self.category_ids == category_id)


def _preview(items, limit=3):
    items = [str(i) for i in items]
    return ', '.join(items[:limit]) + (f' (+{len(items) - limit} more)' if len(items) > limit else '')


def _checked_values(df, path, value_key) -> np.ndarray:
    import pandas as pd
    values = pd.to_numeric(df[value_key], errors='coerce').to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        examples = [f"row {i + 2}: {df[value_key].iloc[i]!r}" for i in bad[:3]]
        raise RankDataError(f"{path} column '{value_key}' must be numeric and finite; {len(bad)} bad value(s): "
                            f"{_preview(examples)}.")
    return values


def load_rank_table(path, img_key='filepath', caption_key='title', value_key='value', category_key='cname',
                    weight_key='sample_weights_by_class', sep='\t', require_category=True, require_value=True,
                    check_category_in_caption=False, check_files=True) -> RankTable:
    """Read and validate a rank CSV; every problem is one clear ``RankDataError``.

    Inference reads the same format with ``require_value=False`` (no ground truth: ``values`` is None).
    """
    import pandas as pd
    if not os.path.isfile(path):
        raise RankDataError(f"CSV file {path} does not exist.")
    try:
        df = pd.read_csv(path, sep=sep)
    except pd.errors.EmptyDataError:
        raise RankDataError(f"{path} is empty; it needs a header row and at least one data row.")
    if len(df) == 0:
        raise RankDataError(f"{path} has a header but no data rows.")
    needed = {'--csv-img-key': img_key, '--csv-caption-key': caption_key}
    if require_value:
        needed['--csv-value-key'] = value_key
    if require_category:
        needed['--csv-category-key'] = category_key
    for flag, column in needed.items():
        if column not in df.columns:
            hint = f" (is --csv-separator right? the header parsed as {list(df.columns)})" if len(df.columns) == 1 else ''
            raise RankDataError(
                f"{path} has no column '{column}' (columns: {list(df.columns)}); rank data needs it: "
                f"rename the column or pass {flag}{hint}.")

    values = None
    if value_key in df.columns:
        values = _checked_values(df, path, value_key)

    paths = [str(p) for p in df[img_key].tolist()]
    if check_files:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise RankDataError(f"{len(missing)} image file(s) listed in {path} do not exist: {_preview(missing)}.")

    captions = [str(c) for c in df[caption_key].tolist()]
    if category_key in df.columns:
        categories = [str(c) for c in df[category_key].tolist()]
    else:
        categories = ['all'] * len(df)
    names = sorted(set(categories))
    index = {name: i for i, name in enumerate(names)}
    category_ids = np.array([index[c] for c in categories], dtype=np.int64)

    if check_category_in_caption:
        absent = [i for i, (c, cap) in enumerate(zip(categories, captions)) if c not in cap]
        if absent:
            examples = [f"row {i + 2}: {categories[i]!r} not in {captions[i]!r}" for i in absent[:3]]
            raise RankDataError(
                f"negative samples replace the category word in the caption, but {len(absent)} caption(s) in {path} "
                f"do not contain their '{category_key}': {_preview(examples)}; fix the captions or use --negative-ratio 0.")

    weights = None
    if weight_key and weight_key in df.columns:
        weights = pd.to_numeric(df[weight_key], errors='coerce').to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise RankDataError(f"{path} column '{weight_key}' must hold finite non-negative sampling weights.")
    return RankTable(paths, captions, category_ids, names, values, weights, str(path))


# --- sampling ----------------------------------------------------------------------------------

class RankBatchSampler:
    """Yields batches of (row, batch_category) keys; batch_category is -1 for positives.

    Per batch (as the official sampler): a category drawn uniformly; ``n_pos = B - round(B * ratio)``
    positives drawn from it without replacement, with probability proportional to the weight column
    when there is one. A category with fewer rows than ``n_pos`` contributes all its rows and the rest
    of the batch is negatives, so every batch has exactly ``batch_size`` samples. Negatives are drawn
    from the other categories only (the original could draw them from the same category and label them 0).

    The global plan of ``len(table) // (batch_size * world_size) * world_size`` batches depends only on
    (seed, epoch); rank r takes batches r, r + world_size, ...
    """

    def __init__(self, table: RankTable, batch_size: int, negative_ratio: float = 0.0, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shared_epoch: Optional[SharedEpoch] = None):
        if batch_size < 2:
            raise RankDataError(f"rank sampling needs --batch-size >= 2 (pairs within a batch), got {batch_size}.")
        self.table = table
        self.batch_size = batch_size
        self.num_negatives = int(round(batch_size * negative_ratio))
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.shared_epoch = shared_epoch or SharedEpoch(0)
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
        for _ in range(self.num_batches * self.world_size):
            category = int(rng.integers(len(self.rows)))
            n_pos = min(self.batch_size - self.num_negatives, len(self.rows[category]))
            positives = self._positives(rng, category, n_pos)
            negatives = self._negatives(rng, category, self.batch_size - n_pos)
            keys = [(int(r), -1) for r in positives] + [(int(r), category) for r in negatives]
            order = rng.permutation(len(keys))
            batches.append([keys[i] for i in order])
        return batches[self.rank::self.world_size]

    def __iter__(self):
        return iter(self.plan(self.shared_epoch.get_value()))


# --- samples -----------------------------------------------------------------------------------

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

    def __len__(self):
        return len(self.table)

    def _caption(self, row, batch_category):
        caption = self.table.captions[row]
        if batch_category < 0:
            return caption, float(self.table.values[row]), int(self.table.category_ids[row])
        own = self.table.category_names[self.table.category_ids[row]]
        return caption.replace(own, self.table.category_names[batch_category]), 0.0, batch_category

    def _load_image(self, row):
        path = self.table.paths[row]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert('RGB'))
        except Exception as err:  # unreadable or truncated file: skip, count, keep training
            self.num_skipped += 1
            _logger.warning(f"Skipping unreadable image {path} ({type(err).__name__}: {err}); "
                            f"{self.num_skipped} skipped so far in this data worker.")
            return None

    def __getitem__(self, key):
        row, batch_category = key if isinstance(key, tuple) else (key, -1)
        image = self._load_image(row)
        if image is None and self.replace_unreadable:
            same = self.table.rows_of(self.table.category_ids[row])
            start = int(np.searchsorted(same, row))
            for step in range(1, len(same)):
                candidate = int(same[(start + step) % len(same)])
                image = self._load_image(candidate)
                if image is not None:
                    row = candidate
                    break
        if image is None:
            return None
        caption, target, category = self._caption(row, batch_category)
        return image, self.tokenize([caption])[0], target, category


def collate_rank_batch(samples, with_pairs: bool = True):
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    images, tokens, targets, categories = zip(*samples)
    return torch.stack(images), RankTexts(
        torch.stack(tokens), torch.tensor(targets, dtype=torch.float32), torch.tensor(categories, dtype=torch.long),
        with_pairs)


# --- transforms and loaders ---------------------------------------------------------------------

def rank_transforms(preprocess_val):
    """As the original: resize to the model's square input without cropping (+ random flip in training)."""
    steps = list(preprocess_val.transforms)
    normalize = next(t for t in steps if isinstance(t, T.Normalize))
    size = None
    for t in steps:
        if isinstance(t, (T.CenterCrop, T.Resize)):
            s = t.size
            size = (s, s) if isinstance(s, int) else tuple(s) if len(s) == 2 else (s[0], s[0])
    common = [T.ToTensor(), T.Normalize(normalize.mean, normalize.std)]
    resize = T.Resize(size, interpolation=T.InterpolationMode.BICUBIC)
    return T.Compose([resize, T.RandomHorizontalFlip(p=0.5), *common]), T.Compose([resize, *common])


def _table_for(args, path, is_train):
    return load_rank_table(
        path, img_key=args.csv_img_key, caption_key=args.csv_caption_key, value_key=args.csv_value_key,
        category_key=args.csv_category_key, weight_key=args.csv_weight_key, sep=args.csv_separator,
        require_category=is_train, check_category_in_caption=is_train and args.negative_ratio > 0)


def _loader(dataset, batch_sampler, args, with_pairs=True):
    collate = functools.partial(collate_rank_batch, with_pairs=with_pairs)
    return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=args.workers, collate_fn=collate,
                      pin_memory=torch.cuda.is_available())


def get_rank_data(args, preprocess_fns, epoch=0, tokenizer=None, with_pairs=True):
    """OpenCLIP-style ``{'train': DataInfo, 'val': DataInfo}`` for rank CSVs.

    ``with_pairs=False`` (single-head loss) makes train batches skip the pair head in the forward pass.
    """
    train_transform, val_transform = rank_transforms(preprocess_fns[1])
    data = {}
    if args.train_data:
        table = _table_for(args, args.train_data, is_train=True)
        shared_epoch = SharedEpoch(epoch)
        sampler = RankBatchSampler(table, args.batch_size, args.negative_ratio, seed=args.seed,
                                   rank=args.rank, world_size=args.world_size, shared_epoch=shared_epoch)
        loader = _loader(RankDataset(table, train_transform, tokenizer), sampler, args, with_pairs)
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
        info = DataInfo(loader)
        info.rank_eval = True
        info.table = table
        data['val'] = info
    return data
