"""``--rank-save-best METRIC``: keep the run's best checkpoint by a validation metric, beside OpenCLIP's own.

After each evaluation whose metrics hold METRIC (``hook.py``'s ``evaluate`` wrapper calls ``keep_best``), the model
is saved as ``epoch_best.pt`` in the run's checkpoint folder when the value beats the recorded best
(``files/best_checkpoint.py``: the checkpoint with its record, then ``best.json``). Which metrics there are and
whether higher or lower is better comes from the registry (``SampleType.metric_goals``) for the plugin's sample
types, and from OpenCLIP's own evaluation (``OPENCLIP_VAL_GOALS``, ``OPENCLIP_ZERO_SHOT_GOALS``) for image-caption
validation and zero-shot ImageNet, so plain CLIP models (e.g. RankCLIP pretraining) can keep the best by
``clip_val_loss`` or ``imagenet-zeroshot-val-top1``.

Validation runs on OpenCLIP's schedule: every ``--val-frequency`` epochs and after the last (zero-shot: every
``--zeroshot-frequency``), so the best is the best of the evaluated epochs.
"""
import logging
import math
import numbers
import os
from typing import Dict, Optional

from .. import registry

_logger = logging.getLogger(__name__)

# open_clip_train.train.evaluate on image-caption --val-data ('default' sample type), OpenCLIP 3.3's keys
OPENCLIP_VAL_GOALS = {
    'clip_val_loss': 'min', 'val_generative_loss': 'min',
    'image_to_text_mean_rank': 'min', 'image_to_text_median_rank': 'min',
    'text_to_image_mean_rank': 'min', 'text_to_image_median_rank': 'min',
    **{f'{direction}_R@{k}': 'max' for direction in ('image_to_text', 'text_to_image') for k in (1, 5, 10)},
}
# open_clip_train.zero_shot.zero_shot_eval, for every model: {flag whose data it needs: {metric: goal}}
OPENCLIP_ZERO_SHOT_GOALS = {
    'imagenet_val': {'imagenet-zeroshot-val-top1': 'max', 'imagenet-zeroshot-val-top5': 'max'},
    'imagenet_v2': {'imagenetv2-zeroshot-val-top1': 'max', 'imagenetv2-zeroshot-val-top5': 'max'},
}


def add_save_best_args(group) -> None:
    group.add_argument(
        '--rank-save-best', type=str, default=None, metavar='METRIC',
        help="Also keep the best checkpoint by a validation metric: after each validation that improves METRIC, "
             "the run's checkpoint folder gets epoch_best.pt (a checkpoint like epoch_N.pt, with the record) and "
             "best.json (epoch, metric, value, that validation's metrics). Metrics: those the validation of "
             "--csv-dataset-sample-type reports ("
             + '; '.join(f"{t.name}: {', '.join(t.metric_goals)}" for t in registry.SAMPLE_TYPES.values()
                         if t.metric_goals)
             + "; CATEGORY/<metric> for one category's), OpenCLIP's for image-caption --val-data (clip_val_loss, "
               "image_to_text_R@1, ...) and zero-shot ImageNet (imagenet-zeroshot-val-top1, ...); losses, MAE and "
               "mean ranks lower is better, the others higher. Needs the metric's data (--val-data, or "
               "--imagenet-val / --imagenet-v2); evaluated every --val-frequency (--zeroshot-frequency) epochs and "
               "after the last, the best is the best of those epochs. --resume latest never takes epoch_best.pt "
               "for the newest. Default: off.")


def validation_goals(sample_type: str) -> Dict[str, str]:
    """{metric: goal} of the validation of ``--csv-dataset-sample-type`` (OpenCLIP's for 'default')."""
    if sample_type == 'default':
        return dict(OPENCLIP_VAL_GOALS)
    entry = registry.SAMPLE_TYPES.get(sample_type)
    return dict(entry.metric_goals) if entry is not None else {}


def zero_shot_goals() -> Dict[str, str]:
    return {metric: goal for goals in OPENCLIP_ZERO_SHOT_GOALS.values() for metric, goal in goals.items()}


def metric_goal(metric: str, sample_type: str):
    """(goal, source) of ``metric`` for a run on ``sample_type``: source is 'val' or the zero-shot flag's dest;
    (None, None) when unknown. 'CATEGORY/<metric>' and '<metric>_span_<s>' take the goal of <metric> (validation
    metrics only)."""
    goals = validation_goals(sample_type)
    if metric in goals:
        return goals[metric], 'val'
    for flag, zero_shot in OPENCLIP_ZERO_SHOT_GOALS.items():
        if metric in zero_shot:
            return zero_shot[metric], flag
    category, _, name = metric.rpartition('/')
    if category and name in goals:
        return goals[name], 'val'
    base, span, _ = metric.partition('_span_')  # '<metric>_span_<s>' (e.g. ordinality per span): <metric>'s goal
    if span and base in goals:
        return goals[base], 'val'
    return None, None


def check_save_best_args(args) -> None:
    """One line (ValueError) for a ``--rank-save-best`` that could never keep anything; changes nothing."""
    metric = getattr(args, 'rank_save_best', None)
    if metric is None:
        return
    sample_type = getattr(args, 'csv_dataset_sample_type', 'default')
    goal, source = metric_goal(metric, sample_type)
    if goal is None:
        known = [*validation_goals(sample_type), *zero_shot_goals()]
        what = ('OpenCLIP\'s image-caption validation' if sample_type == 'default'
                else f'--csv-dataset-sample-type {sample_type}')
        raise ValueError(f"--rank-save-best {metric} is not a metric of {what} or zero-shot ImageNet: "
                         f"give one of {', '.join(known)}.")
    if source == 'val':
        if not getattr(args, 'val_data', None):
            raise ValueError(f"--rank-save-best {metric} is a validation metric: add --val-data (the held-out "
                             f"data it is measured on).")
        frequency, flag = getattr(args, 'val_frequency', 1), '--val-frequency'
    else:
        if not getattr(args, source, None):
            raise ValueError(f"--rank-save-best {metric} is a zero-shot metric: add --{source.replace('_', '-')}.")
        frequency, flag = getattr(args, 'zeroshot_frequency', 1), '--zeroshot-frequency'
    if not frequency:
        raise ValueError(f"--rank-save-best {metric}: {flag} 0 never evaluates it; give {flag} N (every N epochs).")
    if not getattr(args, 'train_data', None):
        raise ValueError("--rank-save-best keeps the best checkpoint of a training run: add --train-data.")
    logs = getattr(args, 'logs', './logs/')
    if not logs or str(logs).lower() == 'none':
        raise ValueError("--rank-save-best writes into logs/<name>/checkpoints: --logs none saves no checkpoint.")


def _plain(value):
    """A metric as JSON has it (numpy numbers as Python's)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def keep_best(model, metrics: Optional[dict], epoch: int, args, save) -> Optional[dict]:
    """After an evaluation (master only, as OpenCLIP saves): ``epoch_best.pt`` + ``best.json`` when ``metrics``
    improve ``--rank-save-best``'s metric over the recorded best. ``save(obj, path)``: the run's checkpoint write
    (atomic, checksummed). Returns the new record, or None."""
    metric = getattr(args, 'rank_save_best', None)
    if not metric or not metrics or not getattr(args, 'save_logs', False):
        return None
    sample_type = getattr(args, 'csv_dataset_sample_type', 'default')
    goal, source = metric_goal(metric, sample_type)
    if metric not in metrics:
        evaluated = goal is not None and any(
            key in metrics for key in (validation_goals(sample_type) if source == 'val'
                                       else OPENCLIP_ZERO_SHOT_GOALS[source]))
        if evaluated:  # this epoch's evaluation ran without it (e.g. a category the validation data lacks)
            _logger.warning(f"--rank-save-best {metric}: not among the metrics of epoch {epoch}'s evaluation "
                            f"({', '.join(k for k in metrics if _finite(metrics[k]))}); no best kept.")
        return None
    value = metrics[metric]
    if not _finite(value):
        _logger.warning(f"--rank-save-best {metric} is {value} at epoch {epoch} (undefined): not a best.")
        return None
    from ..files.best_checkpoint import improves, read_best, write_best
    folder = args.checkpoint_path
    previous = read_best(folder)
    if previous is not None and previous.get('metric') != metric:
        _logger.warning(f"--rank-save-best {metric}: the recorded best in {folder} was kept by "
                        f"{previous.get('metric')}; it is replaced at this validation.")
        previous = None
    if previous is not None and not improves(float(value), previous.get('value'), goal):
        _logger.info(f"--rank-save-best {metric}: {value:.4f} at epoch {epoch}; the best stays "
                     f"{previous.get('value'):.4f} (epoch {previous.get('epoch')}).")
        return None
    from .compat import uncompiled
    from .run_state import current_run
    checkpoint = {'epoch': epoch, 'name': getattr(args, 'name', None),
                  'state_dict': uncompiled(model).state_dict()}  # as OpenCLIP's main saves its epochs
    run = current_run()
    optimizer = run.optimizer() if run is not None else None
    if optimizer is not None:
        checkpoint['optimizer'] = optimizer.state_dict()
    scaler = run.scaler() if run is not None else None
    if scaler is not None:  # AMP's loss scale, as OpenCLIP's own checkpoints keep it
        checkpoint['scaler'] = scaler.state_dict()
    record = {'metric': metric, 'goal': goal, 'value': float(value), 'epoch': epoch,
              'precision': getattr(args, 'precision', None),
              'metrics': {k: _plain(v) for k, v in metrics.items() if isinstance(v, (numbers.Real, str, type(None)))}}
    path = write_best(folder, checkpoint, record, save)
    was = f" (was {previous['value']:.4f} at epoch {previous.get('epoch')})" if previous else ''
    _logger.info(f"--rank-save-best {metric}: {value:.4f} at epoch {epoch}{was}: saved {path}, "
                 f"{os.path.join(folder, 'best.json')}.")
    return record
