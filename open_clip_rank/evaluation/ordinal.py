"""The 'ordinal' sample type's metrics and pictures: validation inside OpenCLIP's loop and the rank CLI's report.

MAE and accuracy by expectation and by argmax (the official runner's ``mae_{exp,max}`` / ``acc_{exp,max}``), the
learned prototypes' ordinality, and two pictures (prototype similarity, predicted vs true): per validation under
``logs/<name>/plots/``, and from the rank CLI with ``--plots DIR``.
"""
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..models.base import unwrap
from ..pictures.heatmaps import confusion_png, heatmap_png
from .metrics import as_array, check_lengths
from .validation import inference_setup, plots_folder

_logger = logging.getLogger(__name__)


def ordinal_metrics(expected, argmax, labels) -> dict:
    """MAE and accuracy of the predicted rank by expectation (rounded for accuracy) and by argmax, as the
    official runner's ``mae_{exp,max}`` / ``acc_{exp,max}``."""
    expected, argmax, labels = (as_array(v) for v in (expected, argmax, labels))
    check_lengths(expected=expected, argmax=argmax, labels=labels)
    if len(labels) == 0:
        return {}
    return {
        'mae_exp': float(np.mean(np.abs(expected - labels))),
        'acc_exp': float(np.mean(np.round(expected) == labels)),
        'mae_max': float(np.mean(np.abs(argmax - labels))),
        'acc_max': float(np.mean(argmax == labels)),
    }


def prototype_ordinality(prototypes) -> float:
    """Share of ordered neighbours among the prototypes' similarities, as the official ``vis_ordinality``
    (full span): over rows i and columns j >= i (j < R-1), how often sim(i, j) > sim(i, j+1), i.e. a
    prototype is more similar to nearer ranks. 1.0: perfectly ordinal; ~0.5: no order."""
    p = np.asarray(prototypes, dtype=np.float64)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    sim = p @ p.T
    if len(sim) < 2:
        return float('nan')
    closer = sim[:-1, :-1] > sim[:-1, 1:]  # entry (i, j): sim(i, j) > sim(i, j + 1)
    upper = np.triu(np.ones_like(closer, dtype=bool))
    return float(closer[upper].mean())


def prototype_similarity_png(prototypes, path, ordinality: float = None):
    """Cosine similarity between every pair of rank prototypes (an ordinal model shows a band)."""
    p = np.asarray(prototypes, dtype=np.float64)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    title = 'Rank prototype similarity' + (f' (ordinality {ordinality:.3f})' if ordinality is not None else '')
    heatmap_png(p @ p.T, path, title, 'rank', 'rank', 'cosine')


@torch.inference_mode()
def predict_ordinal(model, dataloader, device, autocast, input_dtype=None):
    """(expected rank, argmax rank, labels) for every readable image, as CPU tensors."""
    model = unwrap(model)
    expected, argmax, labels = [], [], []
    prototypes = None
    for batch in dataloader:
        if batch is None:
            continue
        images, targets = batch
        images = images.to(device=device, dtype=input_dtype, non_blocking=True)
        with autocast():
            if prototypes is None:
                prototypes = model.encode_prompts(None)  # once: the learned prompts need no text
            predictions = model.rank_predictions(model.encode_image_tokens(images), prototypes)
        expected.append(predictions['expected_rank'].float().cpu())
        argmax.append(predictions['predicted_rank'].cpu())
        labels.append(targets.labels.cpu())
    return torch.cat(expected), torch.cat(argmax), torch.cat(labels)


def ordinal_validation(model, info, args, epoch=None) -> dict:
    device, autocast, input_dtype = inference_setup(model, args)
    expected, argmax, labels = predict_ordinal(model, info.dataloader, device, autocast, input_dtype)
    finite = torch.isfinite(expected)  # as in the rank CLI: a non-finite prediction takes no part, counted
    dropped = int((~finite).sum())
    if dropped:
        expected, argmax, labels = expected[finite], argmax[finite], labels[finite]
        _logger.warning(f"Validation: {dropped} image(s) with a non-finite expected rank left out of the metrics: "
                        f"the model's weights or inputs produce non-finite values (fp16 overflow under --precision "
                        f"{getattr(args, 'precision', '?')}, diverged training).")
    metrics = ordinal_metrics(expected.numpy(), argmax.numpy(), labels.numpy())
    if dropped:
        metrics['num_non_finite'] = float(dropped)
    with torch.inference_mode():
        prototypes = unwrap(model).rank_prototypes().float().cpu().numpy()
    metrics['ordinality'] = prototype_ordinality(prototypes)
    if args.save_logs and epoch is not None:
        folder = plots_folder(args)
        prototype_similarity_png(prototypes, os.path.join(folder, f'epoch_{epoch}_prototype_similarity.png'),
                                 metrics['ordinality'])
        confusion_png(labels.numpy(), argmax.numpy(), info.table.num_ranks,
                      os.path.join(folder, f'epoch_{epoch}_predicted_vs_true.png'))
    return metrics


# --- the rank CLI ---------------------------------------------------------------------------------------

def add_ordinal_cli_args(parser):
    group = parser.add_argument_group('ordinal models')
    group.add_argument('--plots', type=str, default=None, help='Folder for the prototype similarity picture '
                       '(and predicted-vs-true, with labels).')


def ordinal_report(args, model, rows) -> dict:
    """Metrics (MAE / accuracy by expectation and argmax) when labels are present, ordinality, pictures."""
    report = {}
    prototypes = model.rank_prototypes().float().cpu().numpy()
    report['ordinality'] = prototype_ordinality(prototypes)
    labelled = [r for r in rows if r['target'] is not None and r.get('skipped') is None  # skipped: no prediction
                and r.get('expected_rank') is not None and np.isfinite(r['expected_rank'])]
    if labelled:
        report['metrics'] = ordinal_metrics([r['expected_rank'] for r in labelled],
                                            [r['predicted_rank'] for r in labelled], [r['target'] for r in labelled])
        print('\n'.join(f"{name:>8}: {value:.4f}" for name, value in report['metrics'].items()))
    if getattr(args, 'plots', None):
        prototype_similarity_png(prototypes, Path(args.plots) / 'prototype_similarity.png', report['ordinality'])
        if labelled:
            confusion_png([r['target'] for r in labelled], [r['predicted_rank'] for r in labelled], model.num_ranks,
                          Path(args.plots) / 'predicted_vs_true.png')
    return report
