"""Rank CSVs: read and validate ``filepath, title, cname, value[, sample_weights_by_class]`` tables.

Every problem is one ``RankDataError`` line naming the file, column or value and the fix, raised
before anything is trained. Training, validation and inference read the same format.
"""
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np


class RankDataError(ValueError):
    """Bad rank data, found before training starts."""


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


def preview(items, limit=3):
    items = [str(i) for i in items]
    return ', '.join(items[:limit]) + (f' (+{len(items) - limit} more)' if len(items) > limit else '')


def _checked_values(df, path, value_key) -> np.ndarray:
    import pandas as pd
    values = pd.to_numeric(df[value_key], errors='coerce').to_numpy(dtype=np.float64)
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        examples = [f"row {i + 2}: {df[value_key].iloc[i]!r}" for i in bad[:3]]
        raise RankDataError(f"{path} column '{value_key}' must be numeric and finite; {len(bad)} bad value(s): "
                            f"{preview(examples)}.")
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
            raise RankDataError(f"{len(missing)} image file(s) listed in {path} do not exist: {preview(missing)}.")

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
                f"do not contain their '{category_key}': {preview(examples)}; fix the captions or use --negative-ratio 0.")

    weights = None
    if weight_key and weight_key in df.columns:
        weights = pd.to_numeric(df[weight_key], errors='coerce').to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise RankDataError(f"{path} column '{weight_key}' must hold finite non-negative sampling weights.")
    return RankTable(paths, captions, category_ids, names, values, weights, str(path))
