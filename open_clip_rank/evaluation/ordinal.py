"""The 'ordinal' sample type's metrics and pictures: validation inside OpenCLIP's loop and the rank CLI's report.

MAE and accuracy by expectation and by argmax (the official runner's ``mae_{exp,max}`` / ``acc_{exp,max}``), the
learned prototypes' ordinality (at the official spans 1, 2, 4, ..., n-1, optionally over a rank window), and two
pictures (prototype similarity, predicted vs true): per validation under
``logs/<name>/plots/``, and from the rank CLI with ``--plots DIR``.
"""
import logging
import os
from pathlib import Path

import numpy as np
import torch

from ..data.ordinal_options import check_rank_window
from ..models.base import unwrap
from ..pictures.heatmaps import confusion_png, heatmap_png
from .metrics import as_array, check_lengths
from .validation import finite_predictions, inference_setup, plots_folder

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


def prototype_ordinality(prototypes, span: int = None) -> float:
    """Share of ordered neighbours among the prototypes' similarities, as the official ``vis_ordinality``: over
    rows i and columns i <= j < i + span (j < n-1), how often sim(i, j) > sim(i, j+1), i.e. a prototype is more
    similar to nearer ranks. ``span`` None: the full span n-1 (every j >= i). 1.0: perfectly ordinal; ~0.5: no
    order."""
    p = np.asarray(prototypes, dtype=np.float64)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    sim = p @ p.T
    if len(sim) < 2:
        return float('nan')
    closer = sim[:-1, :-1] > sim[:-1, 1:]  # entry (i, j): sim(i, j) > sim(i, j + 1)
    offset = np.arange(len(closer))[None, :] - np.arange(len(closer))[:, None]  # j - i
    counted = (offset >= 0) & (offset < (span if span is not None else len(closer)))
    return float(closer[counted].mean())


def ordinality_spans(num_prototypes: int):
    """The official spans for n prototypes: the powers of two 1, 2, 4, ... up to n-1, and n-1 itself."""
    comparisons = num_prototypes - 1
    if comparisons < 1:
        return []
    spans = [2 ** i for i in range(int(np.floor(np.log2(comparisons))) + 1)]
    return sorted(set(spans + [comparisons]))


def ordinality_metrics(prototypes, window=None) -> dict:
    """``ordinality`` (full span) and ``ordinality_span_<s>`` at every official span, over the prototypes of ranks
    ``window`` = (lo, hi), both included (the official MORPH figures: ranks 15..75), or all of them (None)."""
    p = np.asarray(prototypes, dtype=np.float64)
    if window is not None:
        p = p[window[0]:window[1] + 1]
    metrics = {'ordinality': prototype_ordinality(p)}
    for span in ordinality_spans(len(p)):
        metrics[f'ordinality_span_{span}'] = prototype_ordinality(p, span)
    return metrics


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
    expected, argmax, labels, dropped = finite_predictions(expected, argmax, labels, what='expected rank', args=args)
    metrics = ordinal_metrics(expected.numpy(), argmax.numpy(), labels.numpy())
    if dropped:
        metrics['num_non_finite'] = float(dropped)
    with torch.inference_mode():
        prototypes = unwrap(model).rank_prototypes().float().cpu().numpy()
    window = check_rank_window(getattr(args, 'ordinal_rank_window', None), len(prototypes))
    metrics.update(ordinality_metrics(prototypes, window))
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
    group.add_argument('--ordinal-rank-window', type=int, nargs=2, default=None, metavar=('LO', 'HI'),
                       help='The prototypes\' ordinality (every span) over ranks LO..HI only, both included (the '
                            'official MORPH figures: 15 75). Default: all ranks.')
    group.add_argument('--ordinal-official-transforms', action='store_true',
                       help='Preprocess as the official OrdinalCLIP evaluation does (resize to 8/7 of the input, '
                            'centre crop, ImageNet mean/std): for models trained with --ordinal-official-transforms.')


def ordinal_report(args, model, rows) -> dict:
    """Metrics (MAE / accuracy by expectation and argmax) when labels are present, ordinality, pictures."""
    report = {}
    prototypes = model.rank_prototypes().float().cpu().numpy()
    window = _report_window(getattr(args, 'ordinal_rank_window', None), model.num_ranks)
    spans = ordinality_metrics(prototypes, window)
    report['ordinality'] = spans.pop('ordinality')
    report['ordinality_spans'] = {key[len('ordinality_span_'):]: value for key, value in spans.items()}
    report['ordinality_window'] = list(window) if window is not None else None
    _logger.info(f"Ordinality{' over ranks %d..%d' % window if window else ''}: {report['ordinality']:.4f} (by "
                 f"span: " + ', '.join(f"{span}: {value:.4f}" for span, value in report['ordinality_spans'].items())
                 + ')')
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


def _report_window(window, num_ranks):
    """The rank CLI's window; one that does not fit the model is reported and left out (all ranks), so the ranked
    outputs are still written."""
    try:
        return check_rank_window(window, num_ranks)
    except ValueError as err:
        _logger.error(f"{err} Ordinality over all ranks instead.")
        return None
