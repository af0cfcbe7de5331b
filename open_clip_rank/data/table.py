"""Rank CSVs: read and validate ``filepath, title, cname, value[, sample_weights_by_class]`` tables.

Every problem is one ``RankDataError`` line naming the file, column or value and the fix, raised
before anything is trained. Training, validation and inference read the same format.

Also the helpers every user table in ``data/`` shares: reading it as UTF-8 text (``read_text``), resolving its
relative image paths (``image_base``, ``resolve_image``, ``check_images_exist``) and the whole-word category swap
of negative captions (``has_category_word``, ``swap_category``).
"""
import functools
import io
import os
import re
from dataclasses import dataclass
from typing import List, Optional

import numpy as np

NEGATIVE_TARGET = 0.0  # the target of a negative: an image of another category under the batch's instruction
FLOAT32_MAX = float(np.finfo(np.float32).max)  # targets travel as float32 tensors: beyond this they become inf


class RankDataError(ValueError):
    """Bad rank data, found before training starts."""


# --- text, image paths, category words: shared by every user table in data/ ---------------------------------

def read_text(path) -> str:
    """The text of a user table, read as UTF-8 (a UTF-8 byte-order mark is accepted and dropped).

    Anything else is one ``RankDataError`` naming the file, where decoding failed and the fix, instead of
    Python's ``UnicodeDecodeError`` (which names neither)."""
    with open(path, 'rb') as f:
        data = f.read()
    fix = "save it as UTF-8 (a spreadsheet's 'CSV UTF-8', or iconv -t UTF-8)"
    if data[:2] in (b'\xff\xfe', b'\xfe\xff'):
        order = 'little' if data[:2] == b'\xff\xfe' else 'big'
        raise RankDataError(f"{path} is UTF-16 text ({order}-endian byte-order mark {data[0]:02X} {data[1]:02X}), "
                            f"but tables are read as UTF-8: {fix}.")
    try:
        text = data.decode('utf-8-sig')
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b'\n') + 1
        raise RankDataError(f"{path} is not UTF-8 text: byte 0x{data[err.start]:02X} at byte offset {err.start} (line "
                            f"{line}) is not valid UTF-8 (Latin-1 / Windows-1252?); {fix}.") from None
    if '\x00' in text:
        line = text[:text.index('\x00')].count('\n') + 1
        raise RankDataError(f"{path} holds NUL bytes (from line {line}): UTF-16 text without a byte-order mark? "
                            f"Tables are read as UTF-8: {fix}.")
    return text


def read_table(path, sep):
    """A user CSV as text columns (``dtype=str``, no NA guessing: an empty title stays '', a category 'NA'
    stays 'NA'); numeric columns are parsed by the caller. Decoded by ``read_text``."""
    import pandas as pd
    return pd.read_csv(io.StringIO(read_text(path)), sep=sep, dtype=str, keep_default_na=False)


def image_base(table_path, image_root=None, relative_to_table=False) -> Optional[str]:
    """The folder relative image paths of ``table_path`` resolve against: ``--image-root``, the table's own folder
    (``--csv-relative-paths``), or None (as written: the current folder)."""
    if image_root and relative_to_table:
        raise RankDataError(f"--image-root {image_root} and --csv-relative-paths both say where relative image paths "
                            f"of {table_path} resolve: give one of them.")
    if relative_to_table:
        return os.path.dirname(os.path.abspath(table_path))
    if image_root:
        if not os.path.isdir(image_root):
            raise RankDataError(f"--image-root {image_root} is not a folder; pass the folder the relative image paths "
                                f"of {table_path} are relative to.")
        return image_root
    return None


def image_path_options(args) -> dict:
    """``--image-root`` / ``--csv-relative-paths`` as the table readers take them (training, ``make_shards`` and the
    rank CLI each have both flags; a namespace built without them reads paths as written)."""
    return {'image_root': getattr(args, 'image_root', None),
            'relative_to_table': bool(getattr(args, 'csv_relative_paths', False))}


def resolve_image(path: str, base: Optional[str]) -> str:
    """``path`` under ``base`` when it is relative (absolute paths stay as they are)."""
    return os.path.join(base, path) if base and not os.path.isabs(path) else path


def check_images_exist(written, resolved, source, base, relative_to_table=False) -> None:
    """One ``RankDataError`` for image files that do not exist, naming the folder relative paths resolved against."""
    missing = [(w, r) for w, r in zip(written, resolved) if not os.path.isfile(r)]
    if not missing:
        return
    hint = ''
    if any(not os.path.isabs(w) for w, _ in missing):
        if relative_to_table:
            hint = f" (relative paths resolved against the folder of {source}, {base}, as --csv-relative-paths says)"
        elif base:
            hint = f" (relative paths resolved against --image-root {os.path.abspath(base)})"
        else:
            hint = (f" (relative paths resolved against the current folder {os.getcwd()}: pass --image-root, the "
                    f"folder they are relative to, or --csv-relative-paths if it is the folder of {source})")
    raise RankDataError(f"{len(missing)} image file(s) listed in {source} do not exist: "
                        f"{preview(r for _, r in missing)}{hint}.")


@functools.lru_cache(maxsize=1024)
def _word_pattern(word: str):
    return re.compile(rf'(?<!\w){re.escape(word)}(?!\w)')


def has_category_word(caption: str, category: str) -> bool:
    """Whether ``category`` appears in ``caption`` as a whole word (not inside another word)."""
    return _word_pattern(category).search(caption) is not None


def swap_category(caption: str, own: str, new: str) -> str:
    """A negative's caption: every whole-word ``own`` replaced by ``new`` ("age" never touches "image").

    The official sampler replaced substrings (``str.replace``), which rewrote the category inside other words."""
    return _word_pattern(own).sub(lambda _: new, caption)


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


def _checked_values(df, path, value_key, check_negative_targets=False) -> np.ndarray:
    """The value column as numbers: finite, within float32 range (targets are float32 tensors) and, where
    negatives are drawn (``check_negative_targets``), not below their target."""
    import pandas as pd
    values = pd.to_numeric(df[value_key].str.strip(), errors='coerce').to_numpy(dtype=np.float64)

    def examples(bad):
        return preview([f"row {i + 2}: {df[value_key].iloc[i]!r}" for i in bad[:3]])

    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad):
        raise RankDataError(f"{path} column '{value_key}' must be numeric and finite; {len(bad)} bad value(s): "
                            f"{examples(bad)}.")
    bad = np.flatnonzero(np.abs(values) > FLOAT32_MAX)
    if len(bad):
        raise RankDataError(f"{path} column '{value_key}' has {len(bad)} value(s) beyond float32 range (|value| <= "
                            f"3.4e38; targets are float32 and would become inf): {examples(bad)}; rescale the column.")
    if check_negative_targets:
        bad = np.flatnonzero(values < NEGATIVE_TARGET)
        if len(bad):
            raise RankDataError(
                f"{path} column '{value_key}' has {len(bad)} value(s) below {NEGATIVE_TARGET:g}, the target of "
                f"negatives (other categories' images under a batch's instruction), which would rank above them: "
                f"{examples(bad)}; shift the values so the lowest is >= {NEGATIVE_TARGET:g} or use --negative-ratio 0.")
    return values


def refuse_empty(df, path, column, what):
    """One line for rows whose ``column`` is empty (read as text: pandas would have made it 'nan')."""
    empty = np.flatnonzero([not str(v).strip() for v in df[column].tolist()])
    if len(empty):
        raise RankDataError(f"{path} has {len(empty)} row(s) with an empty '{column}' ({what}): "
                            f"{preview([f'row {i + 2}' for i in empty])}; fill it in or remove the row.")


def load_rank_table(path, img_key='filepath', caption_key='title', value_key='value', category_key='cname',
                    weight_key='sample_weights_by_class', sep='\t', require_category=True, require_value=True,
                    check_category_in_caption=False, check_files=True, check_negative_targets=False,
                    image_root=None, relative_to_table=False) -> RankTable:
    """Read and validate a rank CSV; every problem is one clear ``RankDataError``.

    Inference reads the same format with ``require_value=False`` (no ground truth: ``values`` is None).
    Read as UTF-8 text, every column as text (numbers parsed here). ``check_category_in_caption`` and
    ``check_negative_targets``: negatives will be drawn (``--negative-ratio`` > 0), so every caption must hold
    its category as a whole word and no value may lie below the negatives' target. Relative image paths
    resolve against ``image_root``, the CSV's folder (``relative_to_table``) or, by default, the current folder.
    """
    import pandas as pd
    if not os.path.isfile(path):
        raise RankDataError(f"CSV file {path} does not exist.")
    base = image_base(path, image_root, relative_to_table)
    try:
        df = read_table(path, sep)
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
        values = _checked_values(df, path, value_key, check_negative_targets)

    refuse_empty(df, path, img_key, 'the image path')
    refuse_empty(df, path, caption_key, 'the instruction')
    if category_key in df.columns:
        refuse_empty(df, path, category_key, 'the category word')

    written = [str(p) for p in df[img_key].tolist()]
    paths = [resolve_image(p, base) for p in written]
    if check_files:
        check_images_exist(written, paths, path, base, relative_to_table)

    captions = [str(c) for c in df[caption_key].tolist()]
    if category_key in df.columns:
        categories = [str(c).strip() for c in df[category_key].tolist()]
    else:
        categories = ['all'] * len(df)
    names = sorted(set(categories))
    index = {name: i for i, name in enumerate(names)}
    category_ids = np.array([index[c] for c in categories], dtype=np.int64)

    if check_category_in_caption:
        absent = [i for i, (c, cap) in enumerate(zip(categories, captions)) if not has_category_word(cap, c)]
        if absent:
            examples = [f"row {i + 2}: {categories[i]!r} not a word of {captions[i]!r}" for i in absent[:3]]
            raise RankDataError(
                f"negatives replace the category word in the caption (whole words only), but {len(absent)} caption(s) "
                f"in {path} do not contain their '{category_key}' as a whole word: {preview(examples)}; fix the "
                f"captions or use --negative-ratio 0.")

    weights = None
    if weight_key and weight_key in df.columns:
        weights = pd.to_numeric(df[weight_key], errors='coerce').to_numpy(dtype=np.float64)
        if not np.all(np.isfinite(weights)) or np.any(weights < 0):
            raise RankDataError(f"{path} column '{weight_key}' must hold finite non-negative sampling weights.")
    return RankTable(paths, captions, category_ids, names, values, weights, str(path))
