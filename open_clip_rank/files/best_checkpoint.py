"""The best checkpoint of a run (``--rank-save-best METRIC``): ``epoch_best.pt`` and ``best.json`` in its checkpoint
folder, and ``--resume latest`` never taking the best for the newest.

* ``epoch_best.pt``: a run checkpoint like ``epoch_N.pt`` (OpenCLIP's keys: epoch, name, state_dict, optimizer),
  written atomically with a checksum by the run's checkpoint route, plus ``BEST_KEY``: the record below;
* ``best.json``: the record (metric, goal, value, epoch, precision, the metrics of that validation), written
  atomically after the checkpoint. Should a run stop between the two writes, the record inside the checkpoint wins
  (``read_best``: the checkpoint is newer than the JSON);
* OpenCLIP's ``get_latest_checkpoint`` sorts ``*.pt`` by a natural key, under which ``epoch_best.pt`` comes after
  every ``epoch_N.pt``: ``checkpoints.latest_regular_checkpoint`` is the same search without it
  (``integration/hook.py`` puts it in OpenCLIP's place; ``checkpoints.resume_candidates`` leaves it out too).

Imports no ``open_clip_train`` module.
"""
import json
import logging
import math
import os
from typing import Callable, Optional

_logger = logging.getLogger(__name__)

BEST_CHECKPOINT_NAME = 'epoch_best.pt'
BEST_RECORD_NAME = 'best.json'
BEST_KEY = 'best'  # the record inside epoch_best.pt
GOALS = ('max', 'min')  # higher is better, lower is better


def is_best_checkpoint(path) -> bool:
    return os.path.basename(os.fspath(path)) == BEST_CHECKPOINT_NAME


def improves(value: float, previous: Optional[float], goal: str) -> bool:
    """Whether ``value`` beats ``previous`` under ``goal`` (a tie keeps the earlier; nothing beats a missing one)."""
    if goal not in GOALS:
        raise ValueError(f"goal must be one of {GOALS}, got {goal!r}")
    if value is None or not math.isfinite(value):
        return False
    if previous is None or not math.isfinite(previous):
        return True
    return value > previous if goal == 'max' else value < previous


def _mtime(path) -> Optional[int]:
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return None


def read_best(folder) -> Optional[dict]:
    """The run's best record (``best.json``), or the one inside ``epoch_best.pt`` where that file is newer (the
    JSON write did not happen); None when there is neither."""
    record_path = os.path.join(folder, BEST_RECORD_NAME)
    checkpoint_path = os.path.join(folder, BEST_CHECKPOINT_NAME)
    record_time, checkpoint_time = _mtime(record_path), _mtime(checkpoint_path)
    if checkpoint_time is not None and (record_time is None or checkpoint_time > record_time):
        record = _record_in_checkpoint(checkpoint_path)
        if record is not None:
            return record
    if record_time is None:
        return None
    try:
        with open(record_path) as f:
            record = json.load(f)
    except (OSError, ValueError) as err:
        _logger.warning(f"{record_path} cannot be read ({type(err).__name__}: {err}); the next validation sets the "
                        f"best afresh.")
        return None
    return record if isinstance(record, dict) else None


def _record_in_checkpoint(path) -> Optional[dict]:
    import torch

    from .integrity import verify_file
    if verify_file(path) is not None:
        return None
    try:
        checkpoint = torch.load(path, map_location='cpu', mmap=True, weights_only=True)
    except Exception:  # noqa: BLE001 - an unloadable file holds no record; the next improvement replaces it
        return None
    record = checkpoint.get(BEST_KEY) if isinstance(checkpoint, dict) else None
    return dict(record) if isinstance(record, dict) else None


def write_best(folder, checkpoint: dict, record: dict, save: Callable) -> str:
    """``epoch_best.pt`` (``checkpoint`` with the record under ``BEST_KEY``, through ``save(obj, path)``: the run's
    atomic, checksummed write), then ``best.json``. Returns the checkpoint's path."""
    from .atomic import atomic_write, json_safe
    path = os.path.join(folder, BEST_CHECKPOINT_NAME)
    summary = {k: v for k, v in record.items() if k != 'metrics'}
    save({**checkpoint, BEST_KEY: summary}, path)
    with atomic_write(os.path.join(folder, BEST_RECORD_NAME), 'w') as f:
        json.dump(json_safe({**record, 'checkpoint': BEST_CHECKPOINT_NAME}), f, indent=2, allow_nan=False)
    return path
