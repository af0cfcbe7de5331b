"""The scoring loop: partitions in, one Parquet file per partition out, through the rank-model protocol only.

Per process: the partitions of its rank (``partitions.for_process``) that have no output file yet are streamed
through a DataLoader (``stream.PartitionStream``: decoding in ``--workers`` processes, pinned memory and
non-blocking copies on CUDA); each batch goes through the image tower once (``encode_image_tokens``) and is
scored under each of its prompts (``rank_predictions``), every distinct prompt encoded once per process and
kept. A partition's rows are written when its last batch has been scored, atomically, so a killed run loses at
most the partitions in flight and a rerun does exactly the rest. Memory stays flat: one partition's rows per
partition in flight.
"""
import hashlib
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
from torch.utils.data import DataLoader

from . import outputs
from .partitions import Partition, for_process
from .stream import PartitionStream

_logger = logging.getLogger(__name__)


@dataclass
class ScoringPlan:
    partitions: List[Partition]      # every partition of the input, in order
    prompts: Optional[List[str]]     # every image under each of these; None: each sample's own (or no prompt)
    identity: dict                   # what may not change within one output folder (outputs.IDENTITY_FIELDS)
    prompt_key: Optional[str] = None
    image_key: Optional[str] = None
    extra_keys: tuple = ()
    truth_keys: dict = field(default_factory=dict)  # 'target' / 'category' -> shard json key (ground truth)
    probabilities: bool = False      # write non-scalar predictions (ordinal: probs) as list columns
    load_truncated: bool = False


@dataclass
class ScoringSummary:
    written: List[str] = field(default_factory=list)   # partitions written by this process
    reused: List[str] = field(default_factory=list)    # partitions already complete
    rows: int = 0
    skipped: int = 0
    seconds: float = 0.0


def file_sha256(path, chunk: int = 1 << 24) -> Optional[str]:
    if path is None or not os.path.isfile(path):
        return None
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class _PromptStates:
    """Each distinct prompt's text side, encoded once per process (``encode_prompts``) and kept."""

    def __init__(self, model, tokenizer, device, autocast):
        self.model, self.tokenizer, self.device, self.autocast = model, tokenizer, device, autocast
        self.states: Dict[Optional[str], torch.Tensor] = {}

    def __getitem__(self, prompt: Optional[str]):
        if prompt not in self.states:
            with self.autocast:
                text = None if prompt is None else self.tokenizer([prompt]).to(self.device)
                self.states[prompt] = self.model.encode_prompts(text)
        return self.states[prompt]


def _prompt_groups(rows, prompts, needs_prompt):
    """{prompt: [row indices]}: every row under each of ``prompts``, else each row's own (None: no prompt)."""
    if not needs_prompt:
        return {None: list(range(len(rows)))}
    if prompts is not None:
        return {p: list(range(len(rows))) for p in prompts}
    groups = {}
    for i, row in enumerate(rows):
        groups.setdefault(row['prompt'], []).append(i)
    return groups


def _output_rows(rows, indices, prompt, predictions, probabilities, skipped):
    """One output row per scored (image, prompt); a non-finite prediction is listed as skipped, not written."""
    from ..inference import non_finite_reason
    # one device-to-host copy and one conversion per prediction, not one per image
    scalars = {k: v.float().cpu().tolist() for k, v in predictions.items() if v.ndim == 1}
    others = {k: v.float().cpu().tolist() for k, v in predictions.items() if v.ndim > 1} if probabilities else {}
    out = []
    for j, i in enumerate(indices):
        values = {k: v[j] for k, v in scalars.items()}
        bad = next(((k, x) for k, x in values.items() if not math.isfinite(x)), None)
        row = {**rows[i], 'prompt': prompt if prompt is not None else rows[i].get('prompt', '')}
        if bad is not None:
            skipped.append({**row, 'reason': non_finite_reason(*bad)})
            continue
        out.append({**row, **values, **{k: v[j] for k, v in others.items()}})
    return out


def _columns_in_order(rows):
    """key, prompt, score first, then the other predictions, then url/path and the input's own fields."""
    first = ['key', 'prompt', 'score']
    names = list(dict.fromkeys(k for r in rows for k in r))
    inputs = [k for k in ('url', 'path', 'uid', 'category', 'target') if k in names]
    rest = [k for k in names if k not in first and k not in inputs]
    ordered = [k for k in first if k in names] + rest + inputs
    return [{k: r.get(k) for k in ordered} for r in rows]


@torch.inference_mode()
def score_to_folder(model, transform, tokenizer, plan: ScoringPlan, folder, *, rank: int = 0, world_size: int = 1,
                    batch_size: int = 64, workers: int = 0, device=None, progress: bool = False) -> ScoringSummary:
    """Score this process's share of ``plan.partitions`` into ``folder`` (the rest of a killed run, or all)."""
    from ..inference import autocast_for, image_dtype
    device = torch.device(device) if device is not None else next(model.parameters()).device
    summary = ScoringSummary()
    done = outputs.completed_partitions(folder)
    mine = for_process(plan.partitions, rank, world_size)
    todo = [p for p in mine if p.name not in done]
    summary.reused = [p.name for p in mine if p.name in done]
    if summary.reused:
        _logger.info(f"{len(summary.reused)} partition(s) already scored in {folder}: kept, not redone.")
    if not todo:
        return summary
    stream = PartitionStream(todo, transform, batch_size, prompt_key=plan.prompt_key, image_key=plan.image_key,
                             extra_keys=plan.extra_keys, truth_keys=plan.truth_keys,
                             load_truncated=plan.load_truncated)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=device.type == 'cuda',
                        prefetch_factor=4 if workers else None, persistent_workers=False)
    autocast = autocast_for(model, device, None)
    input_dtype = image_dtype(model)
    prompt_states = _PromptStates(model, tokenizer, device, autocast)
    pending: Dict[str, list] = {}
    pending_skipped: Dict[str, list] = {}
    start = time.perf_counter()
    batches = loader
    if progress:
        from tqdm import tqdm
        batches = tqdm(loader, desc='scoring', unit='batch')
    for batch in batches:
        name = batch['partition']
        rows = pending.setdefault(name, [])
        skipped = pending_skipped.setdefault(name, [])
        if batch['images'] is not None:
            images = batch['images'].to(device=device, dtype=input_dtype, non_blocking=True)
            with autocast:
                # the expensive tower, once per image; contiguous once, so every prompt reads the same layout
                tokens = model.encode_image_tokens(images).contiguous()
                for prompt, indices in _prompt_groups(batch['rows'], plan.prompts, model.needs_prompt).items():
                    group = tokens if len(indices) == len(tokens) else tokens.index_select(  # every row: no copy
                        0, torch.tensor(indices, device=tokens.device))
                    predictions = model.rank_predictions(group, prompt_states[prompt])
                    rows.extend(_output_rows(batch['rows'], indices, prompt, predictions, plan.probabilities,
                                             skipped))
        if batch['final']:
            skipped.extend(batch['skipped'])
            outputs.write_partition(folder, name, _columns_in_order(pending.pop(name)), plan.identity,
                                    [_skip_entry(s) for s in pending_skipped.pop(name)], source=batch['source'])
            summary.written.append(name)
            summary.rows += len(rows)
            summary.skipped += len(skipped)
            if skipped:
                _logger.warning(f"{name}: {len(skipped)} sample(s) skipped, not scored (first: "
                                f"{skipped[0].get('key')}: {skipped[0]['reason']}); listed in its metadata.")
    summary.seconds = time.perf_counter() - start
    return summary


def _skip_entry(skipped: dict) -> dict:
    """What a skipped sample's entry keeps: where it is, its prompt when it had one, the reason."""
    return {k: skipped[k] for k in ('key', 'url', 'path', 'prompt', 'category', 'target', 'reason')
            if skipped.get(k) is not None}
