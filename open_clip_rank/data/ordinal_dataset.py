"""Ordinal data: images with integer rank labels in [0, num_ranks), read into an ``OrdinalDataset``.

Two formats, told apart by the first line:
* a CSV with a header: an image column (``--csv-img-key``) and an integer label column
  (``--csv-value-key``); other columns (caption, category) are ignored;
* the official list files: ``path label [label ...]`` per line, whitespace-separated, no header.
  Several labels per image: a random one each time in training, the middle one in evaluation.

Relative image paths resolve against ``image_root`` (the official ``images_root``; default: as written).
Every problem is one ``RankDataError`` naming the file, row and value, before training starts.
"""
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
from torch.utils.data import Dataset

from .dataset import first_readable, load_image_or_skip
from .table import RankDataError, preview

_logger = logging.getLogger(__name__)


class OrdinalTargets(NamedTuple):
    """The ``texts`` of an ordinal training batch: integer rank labels, moved by OpenCLIP's ``.to()``."""
    labels: torch.Tensor  # [N] long, in [0, num_ranks)

    def to(self, *args, **kwargs):
        return OrdinalTargets(self.labels.to(*args, **kwargs))


@dataclass
class OrdinalTable:
    paths: List[str]
    labels: Optional[List[List[int]]]  # one or more labels per image; None: no ground truth (inference)
    num_ranks: int
    source: str

    def __len__(self):
        return len(self.paths)

    def eval_labels(self) -> Optional[List[int]]:
        """The label each image is evaluated with: the middle one (the official data module)."""
        if self.labels is None:
            return None
        return [labels[len(labels) // 2] for labels in self.labels]


def _parse_label(text, path, where, num_ranks) -> int:
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value != int(value):
        raise RankDataError(f"{path} {where}: label {text!r} is not an integer; ordinal labels are rank indices "
                            f"0..{num_ranks - 1}.")
    if not 0 <= int(value) < num_ranks:
        raise RankDataError(f"{path} {where}: label {int(value)} is outside [0, {num_ranks}) for a model with "
                            f"ordinal_cfg.num_ranks={num_ranks}; fix the label or the model's num_ranks.")
    return int(value)


def _resolve(p, image_root):
    return os.path.join(image_root, p) if image_root and not os.path.isabs(p) else p


def _read_list_file(path, lines, num_ranks, image_root):
    paths, labels = [], []
    for row, line in enumerate(lines, start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise RankDataError(f"{path} line {row}: {line.strip()!r} has no label; list files hold "
                                f"'path label [label ...]' per line.")
        paths.append(_resolve(parts[0], image_root))
        labels.append([_parse_label(v, path, f'line {row}', num_ranks) for v in parts[1:]])
    return paths, labels


def _read_csv(path, sep, img_key, value_key, num_ranks, image_root, require_labels):
    import pandas as pd
    df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    needed = (('--csv-img-key', img_key), ('--csv-value-key', value_key))
    for flag, column in needed if require_labels else needed[:1]:
        if column not in df.columns:
            raise RankDataError(f"{path} has no column '{column}' (columns: {list(df.columns)}); ordinal data needs "
                                f"it: rename the column or pass {flag}.")
    paths = [_resolve(str(p), image_root) for p in df[img_key].tolist()]
    if value_key not in df.columns:
        return paths, None
    labels = [[_parse_label(v, path, f'row {i + 2}', num_ranks)] for i, v in enumerate(df[value_key].tolist())]
    return paths, labels


def load_ordinal_table(path, num_ranks: int, img_key='filepath', value_key='value', sep='\t',
                       image_root: Optional[str] = None, check_files=True, require_labels=True) -> OrdinalTable:
    if not os.path.isfile(path):
        raise RankDataError(f"ordinal data file {path} does not exist.")
    with open(path) as f:
        lines = f.read().splitlines()
    if not any(line.strip() for line in lines):
        raise RankDataError(f"{path} is empty; it needs one image per line.")
    header = lines[0].split(sep)
    if img_key in header:
        paths, labels = _read_csv(path, sep, img_key, value_key, num_ranks, image_root, require_labels)
    else:
        paths, labels = _read_list_file(path, lines, num_ranks, image_root)
    if not paths:
        raise RankDataError(f"{path} has no data rows.")
    if check_files:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            hint = '' if image_root else ' (relative paths: pass --image-root, the folder they are relative to)'
            raise RankDataError(f"{len(missing)} image file(s) listed in {path} do not exist: "
                                f"{preview(missing)}{hint}.")
    return OrdinalTable(paths, labels, num_ranks, str(path))


class OrdinalDataset(Dataset):
    """(image, label) samples. An unreadable image is skipped and counted in the log; in training the next
    readable image takes its place (batches keep their size), in evaluation it is left out."""

    def __init__(self, table: OrdinalTable, transform, train: bool):
        self.table, self.transform, self.train = table, transform, train
        self.eval_labels = table.eval_labels()
        self.num_skipped = 0

    def __len__(self):
        return len(self.table)

    def _load(self, index):
        return load_image_or_skip(self, self.table.paths[index], self.transform)

    def _candidates(self, index):
        """The image, then (in training) every later one, wrapping around: lazily, only on a failure."""
        yield index
        if self.train:
            for step in range(1, len(self.table)):
                yield (index + step) % len(self.table)

    def _label(self, index):
        if self.train:
            return random.choice(self.table.labels[index])
        return self.eval_labels[index]

    def __getitem__(self, index):
        index, image = first_readable(self._load, self._candidates(index))
        if image is None:
            return None
        return image, self._label(index)


def collate_ordinal_batch(samples):
    samples = [s for s in samples if s is not None]
    if not samples:
        return None
    images, labels = zip(*samples)
    return torch.stack(images), OrdinalTargets(torch.tensor(labels, dtype=torch.long))
