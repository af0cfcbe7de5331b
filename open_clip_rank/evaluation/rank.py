"""The 'rank' sample type's metrics: validation inside OpenCLIP's loop and the rank CLI's report.

Per-category and mean SRCC, KRCC, PLCC, MAE and pairwise accuracy of ``rank_scores`` (``metrics.py``).
"""
import logging

import torch

from ..models.base import unwrap
from .metrics import METRIC_NAMES, format_metrics_table, ranking_metrics, round_predictions
from .validation import finite_predictions, inference_setup

_logger = logging.getLogger(__name__)


@torch.inference_mode()
def predict(model, dataloader, device, autocast, input_dtype=None):
    """Scores for every readable validation image: (scores, targets, category_ids) as CPU tensors."""
    model = unwrap(model)
    scores, targets, categories = [], [], []
    for batch in dataloader:
        if batch is None:  # every image of this batch was unreadable (already logged)
            continue
        images, texts = batch
        images = images.to(device=device, dtype=input_dtype, non_blocking=True)
        texts = texts.to(device=device, non_blocking=True)
        with autocast():
            batch_scores = model.rank_scores(images, texts.tokens)
        scores.append(batch_scores.float().cpu())
        targets.append(texts.targets.cpu())
        categories.append(texts.category_ids.cpu())
    return torch.cat(scores), torch.cat(targets), torch.cat(categories)


def ranking_validation(model, info, args, epoch=None) -> dict:
    """Per-category and mean ranking metrics of the model's scores on the validation set.

    Non-finite scores take no part, as in the rank CLI (``compute_metrics``): they are counted
    (``num_non_finite``) and logged, never ranked.
    """
    device, autocast, input_dtype = inference_setup(model, args)
    scores, targets, category_ids = predict(model, info.dataloader, device, autocast, input_dtype)
    scores, targets, category_ids, dropped = finite_predictions(scores, targets, category_ids, what='score',
                                                                args=args)
    names = info.table.category_names
    metrics = ranking_metrics(scores.numpy(), targets.numpy(), [names[i] for i in category_ids.tolist()])
    if dropped:
        metrics['num_non_finite'] = float(dropped)
    return metrics


# --- the rank CLI ---------------------------------------------------------------------------------------

# The pairwise score is a mean win probability in [0, 1]: only order-based metrics compare it with targets
# (PLCC and MAE would measure its scale against the targets', which means nothing).
PAIRWISE_METRICS = ('srcc', 'krcc', 'pair_acc')


def order_metrics_only(metrics):
    """The entries of a ``ranking_metrics`` dict that depend on the order of the scores alone."""
    return {k: v for k, v in metrics.items()
            if k.rpartition('/')[2] in PAIRWISE_METRICS or k.rpartition('/')[2] not in METRIC_NAMES}


def compute_metrics(rows, round_scores=False, key='score'):
    """Ranking metrics of the scored rows that have a target (None when none has)."""
    import numpy as np
    usable = [r for r in rows if r['target'] is not None and r.get(key) is not None and np.isfinite(r[key])]
    if not usable:
        return None
    preds = np.array([r[key] for r in usable])
    if round_scores:
        preds = round_predictions(preds)
    return ranking_metrics(preds, np.array([r['target'] for r in usable]), [r['category'] for r in usable])


def rank_report(args, model, rows) -> dict:
    """The rank CLI's metrics (rows with a target), printed as a table; with ``--pairwise``, the pair head's too."""
    report = {}
    metrics = compute_metrics(rows, args.round)
    if metrics is None:
        return report
    report['metrics'] = metrics
    print(format_metrics_table(metrics))
    if getattr(args, 'pairwise', False):  # mean win probabilities: ranked, not rounded; order-based metrics only
        pairwise = compute_metrics(rows, key='pairwise_score')
        if pairwise is not None:
            report['pairwise_metrics'] = order_metrics_only(pairwise)
            print('\nPair head (--pairwise, mean win probability; order-based metrics only):')
            print(format_metrics_table(report['pairwise_metrics'], metric_names=PAIRWISE_METRICS))
    return report
