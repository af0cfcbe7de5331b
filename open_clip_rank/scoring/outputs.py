"""A score folder: what ``python -m open_clip_rank.rank --output-dir DIR`` writes and ``select`` reads.

Layout::

    DIR/manifest.json                  the run's identity (model, checkpoint and its SHA-256, prompts) and inputs
    DIR/scores/<partition>.parquet     one file per input partition (a shard, or a fixed-size chunk of a folder
                                       or CSV), written atomically: present means complete

Each Parquet file holds one row per (image, prompt) scored, columns ``key`` (the webdataset ``__key__``, or the
file path), ``prompt``, ``score`` and, where known, ``url`` (the shard) or ``path`` (the file), the family's other
per-image predictions (ordinal: ``expected_rank``, ``predicted_rank``; ``probs`` on request), and ``category`` /
``target`` when the input holds ground truth. Its schema metadata (``open_clip_rank``, JSON) repeats the run's
identity and lists the partition's skipped samples with their reasons, so a score file always says what produced
it and what it left out. Nothing here is a hand-written format: Parquet through pyarrow, JSON.
"""
import contextlib
import json
import os
from typing import Dict, Iterator, List, Optional

from ..files.atomic import atomic_path, atomic_write

MANIFEST = 'manifest.json'
SCORES = 'scores'
METADATA_KEY = b'open_clip_rank'
FORMAT_VERSION = 1
# what may not change within one folder: the scores' meaning, and (folders / CSVs) what the chunks hold
IDENTITY_FIELDS = ('model', 'checkpoint_sha256', 'prompts', 'precision', 'chunks')


class ScoreFolderError(ValueError):
    """A score folder that cannot take (or give) these results; the message is one line with the fix."""


def partition_path(folder, name: str) -> str:
    return os.path.join(folder, SCORES, f'{name}.parquet')


def write_partition(folder, name: str, rows: List[dict], identity: dict, skipped: List[dict],
                    source: Optional[str] = None) -> str:
    """One partition's rows (dicts with the same keys) as ``DIR/scores/<name>.parquet``, atomically."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    columns = list(rows[0]) if rows else ['key', 'prompt', 'score']
    table = pa.Table.from_pylist(rows, schema=None) if rows else pa.table(
        {'key': pa.array([], pa.string()), 'prompt': pa.array([], pa.string()), 'score': pa.array([], pa.float64())})
    table = table.select(columns)
    meta = {**identity, 'partition': name, 'source': source, 'num_rows': len(rows), 'num_skipped': len(skipped),
            'skipped': skipped, 'format_version': FORMAT_VERSION}
    table = table.replace_schema_metadata({METADATA_KEY: json.dumps(meta).encode()})
    path = partition_path(folder, name)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)
    return path


def partition_metadata(path) -> dict:
    import pyarrow.parquet as pq
    schema = pq.read_schema(path)
    return json.loads((schema.metadata or {})[METADATA_KEY])


def completed_partitions(folder) -> Dict[str, str]:
    """name -> path of every partition already written (atomic writes: a present file is complete)."""
    scores = os.path.join(folder, SCORES)
    if not os.path.isdir(scores):
        return {}
    return {f[:-len('.parquet')]: os.path.join(scores, f) for f in sorted(os.listdir(scores))
            if f.endswith('.parquet') and not f.startswith('.')}


def identity_mismatch(found: dict, identity: dict) -> Optional[str]:
    for field in IDENTITY_FIELDS:
        if found.get(field) != identity.get(field):
            return f"{field} {found.get(field)!r} there, {identity.get(field)!r} now"
    return None


def check_folder_identity(folder, identity: dict) -> None:
    """Refuse to mix results of another model, checkpoint, prompt set or precision into ``folder`` (its manifest,
    or, without one, the first score file's metadata)."""
    found = read_manifest(folder)
    if found is None:
        written = completed_partitions(folder)
        if not written:
            return
        found = partition_metadata(next(iter(written.values())))
    difference = identity_mismatch(found, identity)
    if difference is not None:
        raise ScoreFolderError(
            f"--output-dir {folder} holds scores of another run ({difference}); give a new --output-dir, or delete "
            f"{os.path.join(folder, SCORES)} to score again (a rerun must use the same model, checkpoint, prompts, "
            f"precision and, for a folder or CSV, the same files and --partition-size).")


def read_manifest(folder) -> Optional[dict]:
    path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f)


def write_manifest(folder, manifest: dict) -> None:
    os.makedirs(folder, exist_ok=True)
    with atomic_write(os.path.join(folder, MANIFEST), 'w', encoding='utf-8') as f:
        json.dump(manifest, f, indent=2)


def iter_score_tables(folder, columns=None) -> Iterator:
    """(partition name, pyarrow Table) for every written partition, in name order (memory: one file at a time)."""
    import pyarrow.parquet as pq
    for name, path in completed_partitions(folder).items():
        yield name, pq.read_table(path, columns=columns)


def read_scores(folder, columns=None):
    """All partitions as one pyarrow Table (for metrics and curation of folders that fit in memory)."""
    import pyarrow as pa
    tables = [table for _, table in iter_score_tables(folder, columns)]
    if not tables:
        raise ScoreFolderError(f"{folder} holds no score files ({os.path.join(folder, SCORES, '*.parquet')}); "
                               f"score images into it first: python -m open_clip_rank.rank ... --output-dir {folder}.")
    return pa.concat_tables(tables, promote_options='default')


def skipped_samples(folder) -> List[dict]:
    """Every partition's skipped samples ({'key', 'reason', 'partition'})."""
    out = []
    for name, path in completed_partitions(folder).items():
        out.extend({**s, 'partition': name} for s in partition_metadata(path).get('skipped', []))
    return out


def remove_stale_temporaries(folder) -> int:
    """Hidden temporary files a killed run left in ``DIR/scores`` (``files/atomic.py`` names): never results, so a
    rerun removes them. Call before any process of the new run writes."""
    scores = os.path.join(folder, SCORES)
    if not os.path.isdir(scores):
        return 0
    stale = [f for f in os.listdir(scores) if f.startswith('.') and '.parquet.tmp-' in f]
    for name in stale:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(scores, name))
    return len(stale)
