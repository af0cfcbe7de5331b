"""Curation of a score folder (what ``python -m open_clip_rank.select`` runs): which rows to keep, the kept
samples' identities, the DataComp-style uid list, new shards holding only the kept samples, and score buckets.

Pure functions on pyarrow tables, no torch, no OpenCLIP:

* ``select_rows``: keep rows by a threshold (score >= X; with ``lowest``, score <= X) or a top fraction
  (the ``ceil(F * n)`` best of the n rows with a score), over all rows or per prompt. Rows are ordered by
  (score, best first; then key, then url, ascending), so a top fraction keeps an exact, deterministic count:
  rows tied at the cut are split by key. NaN (and null) scores are never kept and never counted in n.
* ``unique_samples``: one row per sample (the ``url`` + ``key`` pair where shards were scored, else ``key``),
  however many prompts kept it.
* ``uid_array``: DataComp's ``.npy`` (sorted unique ``u8,u8`` pairs of the 32-hex-digit ``uid``) when every
  kept sample has one, else the sorted unique keys as a NumPy unicode array.
* ``reshard``: the kept samples, each exactly once, copied file by file (names and bytes unchanged) from their
  source shards into new shards written atomically (each complete or absent).
* ``score_buckets``: equal-count score buckets (deciles by default) with a few evenly spread samples each.
"""
import itertools
import logging
import math
import os
import re
import tarfile
import time
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from ..files.atomic import atomic_path
from ..files.images import SHARD_IMAGE_KEYS
from .outputs import ScoreFolderError, completed_partitions

# the columns select reads and writes: the identity of a sample and the prompt; the score column is added
IDENTITY_COLUMNS = ('key', 'prompt', 'url', 'path', 'uid')
SHARD_PATTERN = 'kept-%06d.tar'
DATACOMP_UID = re.compile(r'^[0-9a-fA-F]{32}$')
_logger = logging.getLogger(__name__)


class CurationError(ScoreFolderError):
    """Input select cannot use (a missing column, a folder without shard urls for --reshard, ...): one line."""


# --- reading -------------------------------------------------------------------------------------------

def folder_columns(folder) -> List[str]:
    """Every column name any partition of the folder holds, in first-seen order."""
    import pyarrow.parquet as pq
    names = {}
    for path in completed_partitions(folder).values():
        names.update(dict.fromkeys(pq.read_schema(path).names))
    return list(names)


def read_selection_table(folder, column: str = 'score'):
    """The identity columns present and ``column`` of every partition, as one table (partitions lacking a
    column, e.g. ``uid``, read it as null). Raises ``ScoreFolderError`` for a folder without score files and
    ``CurationError`` when no partition holds ``column``."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    partitions = completed_partitions(folder)
    if not partitions:
        raise ScoreFolderError(f"{folder} holds no score files ({os.path.join(folder, 'scores', '*.parquet')}); "
                               f"score images into it first: python -m open_clip_rank.rank ... --output-dir "
                               f"{folder}.")
    available = folder_columns(folder)
    if column not in available:
        numeric = [c for c in available if c not in IDENTITY_COLUMNS]
        raise CurationError(f"the score files of {folder} have no column {column!r}; --score-column is one of "
                            f"{', '.join(numeric)}.")
    wanted = [c for c in (*IDENTITY_COLUMNS, 'score', column) if c in available]
    wanted = list(dict.fromkeys(wanted))
    tables = []
    for path in partitions.values():
        names = pq.read_schema(path).names
        tables.append(pq.read_table(path, columns=[c for c in wanted if c in names]))
    table = pa.concat_tables(tables, promote_options='default')
    return table.select([c for c in wanted if c in table.column_names])


# --- selection -----------------------------------------------------------------------------------------

def column_scores(table, column) -> np.ndarray:
    """``column`` as float64 (null as NaN); refuses a missing or non-numeric column in one line."""
    import pyarrow as pa
    import pyarrow.compute as pc
    if column not in table.column_names:
        raise CurationError(f"no column {column!r} among {', '.join(table.column_names)}.")
    field = table.schema.field(column).type
    if not (pa.types.is_floating(field) or pa.types.is_integer(field) or pa.types.is_decimal(field)):
        raise CurationError(f"column {column!r} holds {field}, not numbers; --score-column names a numeric column.")
    values = pc.cast(table[column], pa.float64())
    return np.asarray(pc.fill_null(values, float('nan')).to_numpy(zero_copy_only=False), dtype=np.float64)


def prompt_groups(table) -> Tuple[np.ndarray, List[Optional[str]]]:
    """(group code per row, prompt per code) in first-appearance order; a null prompt is a group of its own."""
    import pyarrow.compute as pc
    if 'prompt' not in table.column_names or table.num_rows == 0:
        return np.zeros(table.num_rows, dtype=np.int64), [None]
    encoded = table['prompt'].combine_chunks().dictionary_encode()
    prompts = encoded.dictionary.to_pylist()
    codes = np.asarray(pc.fill_null(encoded.indices, len(prompts)).to_numpy(zero_copy_only=False), dtype=np.int64)
    if encoded.null_count:
        prompts.append(None)
    return codes, prompts


def _order(table, scores: np.ndarray, groups: np.ndarray, lowest: bool) -> np.ndarray:
    """Row indices sorted by (group, score best first, key, url); NaN scores left out."""
    import pyarrow as pa
    import pyarrow.compute as pc
    valid = np.flatnonzero(~np.isnan(scores))
    columns = {'g': pa.array(groups[valid]), 's': pa.array(scores[valid])}
    sort_keys = [('g', 'ascending'), ('s', 'ascending' if lowest else 'descending')]
    for name in ('key', 'url', 'path'):
        if name in table.column_names:
            columns[name] = table[name].take(pa.array(valid))
            sort_keys.append((name, 'ascending'))
    order = pc.sort_indices(pa.table(columns), sort_keys=sort_keys) if len(valid) else pa.array([], pa.int64())
    return valid[np.asarray(order.to_numpy(zero_copy_only=False), dtype=np.int64)]


def check_rule(threshold=None, top_fraction=None) -> None:
    if (threshold is None) == (top_fraction is None):
        raise CurationError("give exactly one rule: --threshold X or --top-fraction F.")
    if top_fraction is not None and not (0 < top_fraction <= 1):
        raise CurationError(f"--top-fraction must lie in (0, 1], got {top_fraction}.")
    if threshold is not None and math.isnan(threshold):
        raise CurationError("--threshold is NaN: give a number.")


def top_count(fraction: float, n: int) -> int:
    """ceil(fraction * n), robust to binary fractions (0.3 * 10 is 3, not 4)."""
    return min(n, math.ceil(round(fraction * n, 9)))


def select_indices(table, threshold=None, top_fraction=None, per_prompt=False, column='score', lowest=False):
    """(kept row indices, ordered by prompt group then best first; one summary dict per group)."""
    check_rule(threshold, top_fraction)
    scores = column_scores(table, column)
    if per_prompt:
        groups, prompts = prompt_groups(table)
    else:
        groups, prompts = np.zeros(table.num_rows, dtype=np.int64), [None]
    order = _order(table, scores, groups, lowest)
    bounds = np.searchsorted(groups[order], np.arange(len(prompts) + 1))
    kept, summary = [], []
    for g, prompt in enumerate(prompts):
        ranked = order[bounds[g]:bounds[g + 1]]
        if threshold is not None:
            chosen = ranked[scores[ranked] <= threshold] if lowest else ranked[scores[ranked] >= threshold]
            cut = float(threshold)
        else:
            chosen = ranked[:top_count(top_fraction, len(ranked))]
            cut = float(scores[chosen[-1]]) if len(chosen) else None
        kept.append(chosen)
        entry = {'rows': int((groups == g).sum()), 'scored': int(len(ranked)), 'kept': int(len(chosen)), 'cut': cut}
        summary.append({'prompt': prompt, **entry})  # overall: one entry, prompt None
    return (np.concatenate(kept) if kept else np.zeros(0, np.int64)), summary


def select_rows(table, threshold=None, top_fraction=None, per_prompt=False, column='score', lowest=False):
    """The kept rows of ``table`` (see the module docstring), ordered by prompt group, then best first."""
    import pyarrow as pa
    indices, _ = select_indices(table, threshold, top_fraction, per_prompt, column, lowest)
    return table.take(pa.array(indices, pa.int64()))


# --- kept samples --------------------------------------------------------------------------------------

def sample_identity_columns(table) -> Tuple[str, ...]:
    """What names one sample: its shard and key where shards were scored, else its key (the file path)."""
    return ('url', 'key') if 'url' in table.column_names else ('key',)


def unique_samples(table):
    """One row per sample (first occurrence kept, order kept): key and, where present, url, path and uid."""
    import pyarrow as pa
    identity = sample_identity_columns(table)
    seen, rows = set(), []
    columns = [table[c].to_pylist() for c in identity]
    for i, ident in enumerate(zip(*columns)):
        if ident not in seen:
            seen.add(ident)
            rows.append(i)
    keep = [c for c in ('key', 'url', 'path', 'uid') if c in table.column_names]
    return table.select(keep).take(pa.array(rows, pa.int64()))


def uid_array(samples) -> Tuple[np.ndarray, str]:
    """(array, kind) for the ``.npy``: kind 'datacomp' (sorted unique ``u8,u8``, DataComp's baselines' format)
    when every sample has a 32-hex-digit ``uid``, else 'keys' (sorted unique keys, NumPy unicode)."""
    uids = samples['uid'].to_pylist() if 'uid' in samples.column_names else []
    if uids and all(isinstance(u, str) and DATACOMP_UID.match(u) for u in uids):
        pairs = np.array([(int(u[:16], 16), int(u[16:32], 16)) for u in uids], np.dtype('u8,u8'))
        return np.unique(pairs), 'datacomp'  # np.unique sorts: (high 64 bits, low 64 bits), as DataComp's
    keys = sorted(set(samples['key'].to_pylist()))
    return np.array(keys, dtype=str) if keys else np.zeros(0, dtype='<U1'), 'keys'


# --- reading and writing shards ------------------------------------------------------------------------

def _is_local(url: str) -> bool:
    return not url.startswith('pipe:') and '://' not in url


def _sample_key(fname: str) -> Optional[str]:
    from webdataset.tariterators import base_plus_ext
    return base_plus_ext(fname)[0]


def shard_samples(url: str, keys=None) -> Iterator[Tuple[str, List[Tuple[str, bytes]]]]:
    """(key, [(file name, bytes), ...]) per sample of a shard, in tar order, files as stored (webdataset opens
    the URL: local paths, ``pipe:`` commands, ``s3://`` ...; samples are consecutive files sharing a key, as
    webdataset groups them). ``keys``: read only those samples' files (the rest are skipped in the stream)."""
    from webdataset.tariterators import tar_file_expander, url_opener
    if _is_local(url) and not os.path.isfile(url):
        raise CurationError(f"shard {url} named in the score folder does not exist: the shards must stay where "
                            f"they were scored.")
    select = None if keys is None else (lambda fname: _sample_key(fname) in keys)
    current, files = None, []
    try:
        for entry in tar_file_expander(url_opener([{'url': url}]), select_files=select):
            key = _sample_key(entry['fname'])
            if key is None:
                continue
            if key != current and files:
                yield current, files
                files = []
            current = key
            files.append((entry['fname'], entry['data']))
    except (OSError, tarfile.TarError, ValueError) as err:
        raise CurationError(f"cannot read shard {url} ({type(err).__name__}: {str(err).splitlines()[0]}).") from err
    if files:
        yield current, files


def kept_shard_samples(samples) -> Iterator[Tuple[str, str, List[Tuple[str, bytes]]]]:
    """(url, key, files) for every kept sample exactly once, shard by shard in sorted url order, each shard in
    tar order; only shards holding kept samples are read. Raises ``CurationError`` naming kept samples that
    their shard does not hold (after yielding every one it found)."""
    if 'url' not in samples.column_names:
        raise CurationError("--reshard needs a folder scored from shards (a 'url' column); these scores name "
                            "image files: copy the kept files with the paths of kept.parquet instead.")
    wanted: Dict[str, set] = {}
    for url, key in zip(samples['url'].to_pylist(), samples['key'].to_pylist()):
        if url is None:
            raise CurationError(f"kept sample {key} has no shard url: --reshard needs every kept sample scored "
                                f"from a shard.")
        wanted.setdefault(url, set()).add(key)
    missing = []
    for url in sorted(wanted):
        keys, written = wanted[url], set()
        for key, files in shard_samples(url, keys):
            if key in keys and key not in written:
                written.add(key)
                yield url, key, files
        missing.extend(f"{key} in {url}" for key in sorted(keys - written))
    if missing:
        raise CurationError(f"{len(missing)} kept sample(s) are not in their shard any more (e.g. "
                            f"{', '.join(missing[:3])}): the shards changed since scoring.")


def _add(tar, name, data, mtime):
    import io
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), mtime, 0o644
    tar.addfile(info, io.BytesIO(data))


def write_shards(samples: Iterable[Tuple[str, str, List[Tuple[str, bytes]]]], folder, max_samples: int,
                 pattern: str = SHARD_PATTERN) -> Dict[str, int]:
    """Write (url, key, files) samples into ``folder/<pattern % i>`` shards of at most ``max_samples``, each
    through ``files/atomic.atomic_path`` (complete or absent); returns {shard name: sample count}."""
    os.makedirs(folder, exist_ok=True)
    sizes, mtime = {}, int(time.time())
    samples = iter(samples)
    for first in samples:
        name, count = pattern % len(sizes), 0
        with atomic_path(os.path.join(folder, name)) as tmp, tarfile.open(tmp, 'w') as tar:
            for _, _, files in itertools.chain([first], itertools.islice(samples, max_samples - 1)):
                for fname, data in files:
                    _add(tar, fname, data, mtime)
                count += 1
        sizes[name] = count
        _logger.info(f"wrote {os.path.join(folder, name)} ({count} samples; {sum(sizes.values())} so far)")
    return sizes


def shards_url(folder, sizes: Dict[str, int], pattern: str = SHARD_PATTERN) -> str:
    """The brace-expanded URL of the written shards (for ``--train-data``)."""
    if len(sizes) == 1:
        return os.path.join(folder, next(iter(sizes)))
    prefix, suffix = pattern.split('%06d')
    return os.path.join(folder, f"{prefix}{{{0:06d}..{len(sizes) - 1:06d}}}{suffix}")


def reshard(samples, folder, max_samples: int) -> Dict[str, int]:
    """The kept ``samples`` (``unique_samples``' table) as new shards in ``folder`` (see ``write_shards``)."""
    return write_shards(kept_shard_samples(samples), folder, max_samples)


def images_by_key(rows: Sequence[dict], image_keys=SHARD_IMAGE_KEYS) -> Dict[Tuple, object]:
    """(url or None, key) -> image source (a path, or a shard sample's image bytes) for the given rows: files by
    their ``path`` (or key), shard samples read from their shards (each shard once). Missing ones are absent."""
    out, by_url = {}, {}
    for row in rows:
        url = row.get('url')
        if url:
            by_url.setdefault(url, set()).add(row['key'])
        else:
            out[(None, row['key'])] = row.get('path') or row['key']
    for url, keys in sorted(by_url.items()):
        try:
            for key, files in shard_samples(url, keys):
                by_ext = {f[len(key) + 1:].lower(): d for f, d in files}
                image = next((by_ext[e] for e in image_keys if e in by_ext), None)
                if image is not None:
                    out.setdefault((url, key), image)
        except CurationError:
            continue  # the picture shows a placeholder for what cannot be read
    return out


# --- score buckets -------------------------------------------------------------------------------------

def pick_evenly(n: int, limit: int) -> List[int]:
    """At most ``limit`` positions of ``range(n)`` spread over it, first and last included."""
    if n <= limit:
        return list(range(n))
    if limit <= 1:
        return [0] if limit == 1 else []
    step = (n - 1) / (limit - 1)
    return [round(i * step) for i in range(limit)]


def score_buckets(table, column='score', buckets=10, per_bucket=5, per_prompt=None, lowest=False) -> List[dict]:
    """Per prompt (``per_prompt`` None: when the table holds several prompts) a section ``{'prompt', 'scores'
    (every number of the column), 'buckets': [{'low', 'high', 'count', 'samples': [row dicts]}]}``: equal-count
    buckets by rank (best first: highest scores, or lowest with ``lowest``), so deciles hold a tenth of the rows
    each; each bucket shows ``per_bucket`` rows spread evenly over it."""
    scores = column_scores(table, column)
    codes, prompts = prompt_groups(table)
    if per_prompt is None:
        per_prompt = len(prompts) > 1
    if not per_prompt:
        codes, prompts = np.zeros(table.num_rows, dtype=np.int64), ['all prompts' if len(prompts) > 1 else prompts[0]]
    order = _order(table, scores, codes, lowest)
    bounds = np.searchsorted(codes[order], np.arange(len(prompts) + 1))
    keep = [c for c in ('key', 'url', 'path', 'prompt') if c in table.column_names]
    sections = []
    for g, prompt in enumerate(prompts):
        ranked = order[bounds[g]:bounds[g + 1]]
        n = len(ranked)
        section = {'prompt': prompt, 'scores': scores[ranked], 'rows': int((codes == g).sum()), 'buckets': []}
        for b in range(min(buckets, n)):
            members = ranked[b * n // min(buckets, n):(b + 1) * n // min(buckets, n)]
            picked = [int(members[i]) for i in pick_evenly(len(members), per_bucket)]
            rows = table.select(keep).take(picked).to_pylist()
            for row, i in zip(rows, picked):
                row['score'] = float(scores[i])
            values = scores[members]
            section['buckets'].append({'low': float(values.min()), 'high': float(values.max()),
                                       'count': int(len(members)), 'samples': rows})
        sections.append(section)
    return sections
