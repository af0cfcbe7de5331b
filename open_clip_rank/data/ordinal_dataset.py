"""Ordinal data: images with integer rank labels in [0, num_ranks), read into an ``OrdinalDataset``.

Two formats, told apart by the first line:
* a CSV with a header: an image column (``--csv-img-key``) and an integer label column
  (``--csv-value-key``); other columns (caption, category) are ignored;
* the official list files: ``path label [label ...]`` per line, whitespace-separated, no header.
  Several labels per image: a random one each time in training, the middle one in evaluation. The labels are
  the trailing numbers of a line and the path everything before them, so a path may hold spaces.

Both are read as UTF-8 (a byte-order mark is dropped). Relative image paths resolve against ``image_root`` (the
official ``images_root``), the file's own folder (``relative_to_table``) or, by default, the current folder.
Every problem is one ``RankDataError`` naming the file, row and value, before training starts.
"""
import io
import logging
import math
import os
import random
import re
from dataclasses import dataclass
from typing import List, NamedTuple, Optional

import torch
from torch.utils.data import Dataset

from .dataset import first_readable, load_image_or_skip, truncated_images_allowed
from .table import RankDataError, check_images_exist, image_base, read_text, refuse_empty, resolve_image

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


_TOKEN = re.compile(r'\S+')


def _is_number(token: str) -> bool:
    try:
        float(token)
    except ValueError:
        return False
    return True


def split_list_line(line: str):
    """(path, label tokens) of a list-file line: the labels are the trailing tokens that are numbers (the official
    format allows several), the path is everything before them, its inner spaces kept; at least the first token
    is path. A path whose last space-separated part is itself a number cannot be told from a label."""
    tokens = list(_TOKEN.finditer(line))
    if not tokens:
        return None, []
    first_label = len(tokens)
    while first_label > 1 and _is_number(tokens[first_label - 1].group()):
        first_label -= 1
    path = line[tokens[0].start():tokens[first_label - 1].end()]
    return path, [t.group() for t in tokens[first_label:]]


def _read_list_file(path, lines, num_ranks):
    paths, labels = [], []
    for row, line in enumerate(lines, start=1):
        image, values = split_list_line(line)
        if image is None:
            continue
        if not values:
            parts = image.split()
            problem = f"label {parts[-1]!r} is not an integer (or {image!r} has no label)" if len(parts) > 1 \
                else f"{image!r} has no label"
            raise RankDataError(f"{path} line {row}: {problem}; list files hold 'path label [label ...]' per line, "
                                f"the labels being the line's trailing numbers, rank indices 0..{num_ranks - 1}.")
        paths.append(image)
        labels.append([_parse_label(v, path, f'line {row}', num_ranks) for v in values])
    return paths, labels


def _read_csv(path, text, sep, img_key, value_key, num_ranks, require_labels):
    import pandas as pd
    df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    needed = (('--csv-img-key', img_key), ('--csv-value-key', value_key))
    for flag, column in needed if require_labels else needed[:1]:
        if column not in df.columns:
            raise RankDataError(f"{path} has no column '{column}' (columns: {list(df.columns)}); ordinal data needs "
                                f"it: rename the column or pass {flag}.")
    refuse_empty(df, path, img_key, 'the image path')
    paths = [str(p) for p in df[img_key].tolist()]
    if value_key not in df.columns:
        return paths, None
    labels = [[_parse_label(v, path, f'row {i + 2}', num_ranks)] for i, v in enumerate(df[value_key].tolist())]
    return paths, labels


def load_ordinal_table(path, num_ranks: int, img_key='filepath', value_key='value', sep='\t',
                       image_root: Optional[str] = None, check_files=True, require_labels=True,
                       relative_to_table=False) -> OrdinalTable:
    if not os.path.isfile(path):
        raise RankDataError(f"ordinal data file {path} does not exist.")
    base = image_base(path, image_root, relative_to_table)
    text = read_text(path)
    lines = text.splitlines()
    if not any(line.strip() for line in lines):
        raise RankDataError(f"{path} is empty; it needs one image per line.")
    header = [name.strip().strip('"') for name in lines[0].split(sep)]
    if img_key in header:
        written, labels = _read_csv(path, text, sep, img_key, value_key, num_ranks, require_labels)
    else:
        written, labels = _read_list_file(path, lines, num_ranks)
    if not written:
        raise RankDataError(f"{path} has no data rows.")
    paths = [resolve_image(p, base) for p in written]
    if check_files:
        check_images_exist(written, paths, path, base, relative_to_table)
    return OrdinalTable(paths, labels, num_ranks, str(path))


class OrdinalDataset(Dataset):
    """(image, label) samples. An unreadable image is skipped and counted in the log; in training the next
    readable image takes its place (batches keep their size), in evaluation it is left out."""

    def __init__(self, table: OrdinalTable, transform, train: bool):
        self.table, self.transform, self.train = table, transform, train
        self.eval_labels = table.eval_labels()
        self.num_skipped = 0
        self.load_truncated_images = truncated_images_allowed()

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
