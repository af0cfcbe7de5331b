"""Validation of rank models inside OpenCLIP's training loop (``--val-data`` of a family's sample type).

Runs on the master process over the whole validation set exactly once, on OpenCLIP's validation
schedule (like its own ``evaluate``, which also evaluates unsharded on rank 0), through the rank-model
protocol only, and reports to the log, tensorboard, wandb and ``results.jsonl``, as OpenCLIP reports
its own validation metrics. What is measured is the sample type's (``SampleType.validation``: ``rank.py``,
``ordinal.py``); ``inference_setup`` gives each the device, autocast and input dtype of the run's precision.
"""
import json
import logging
import os

import torch

from .. import registry
from ..integration.compat import openclip_evaluates_val

_logger = logging.getLogger(__name__)


def evaluate_ranking(model, data, epoch, args, tb_writer=None, other_metrics=None):
    """Same contract as ``open_clip_train.train.evaluate``: returns the metrics dict (master only).

    ``other_metrics`` (e.g. OpenCLIP's zero-shot ImageNet results for this epoch) are reported
    together with the ranking metrics: one log line, one ``results.jsonl`` record per evaluation.
    """
    from open_clip_train.distributed import is_master

    if not is_master(args):
        return {}
    metrics = dict(other_metrics or {})
    if openclip_evaluates_val(args, epoch):
        info = data['val']
        metrics.update(registry.SAMPLE_TYPES[info.sample_type].validate(model, info, args, epoch=epoch))
    if not metrics:
        return metrics
    # the precision the model ran at: metrics at 'amp' differ from 'fp32' ones (the rank CLI records it too)
    metrics = {'epoch': epoch, **metrics, 'precision': getattr(args, 'precision', None)}
    _logger.info(f"Eval Epoch: {epoch} " + "\t".join(f"{k}: {v:.4f}" if _is_number(v) else f"{k}: {v}"
                                                     for k, v in metrics.items()))
    _report(metrics, epoch, args, tb_writer)
    return metrics


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def inference_setup(model, args):
    """(device, autocast, input dtype) of the run's ``--precision``; puts the model in eval mode."""
    from open_clip.model import get_input_dtype
    from open_clip_train.precision import get_autocast
    device = torch.device(args.device)
    model.eval()
    return device, get_autocast(args.precision, device_type=device.type), get_input_dtype(args.precision)


def finite_predictions(predictions, *aligned, what: str, args):
    """(predictions, *aligned, number dropped): the rows whose prediction is finite, as in the rank CLI, where a
    non-finite prediction is never ranked; the number dropped is logged (and reported as ``num_non_finite``)."""
    finite = torch.isfinite(predictions)
    dropped = int((~finite).sum())
    if not dropped:
        return (predictions, *aligned, 0)
    _logger.warning(f"Validation: {dropped} image(s) with a non-finite {what} left out of the metrics: the model's "
                    f"weights or inputs produce non-finite values (fp16 overflow under --precision "
                    f"{getattr(args, 'precision', '?')}, diverged training).")
    return (predictions[finite], *(x[finite] for x in aligned), dropped)


def plots_folder(args):
    """Where validation pictures go: ``logs/<name>/plots/``."""
    return os.path.join(os.path.dirname(args.checkpoint_path), 'plots')


def _report(metrics, epoch, args, tb_writer):
    from ..files.atomic import json_safe
    log_data = {f'val/{name}': value for name, value in metrics.items() if _is_number(value)}  # scalars only
    if args.save_logs:
        if tb_writer is not None:
            for name, value in log_data.items():
                tb_writer.add_scalar(name, value, epoch)
        with open(os.path.join(args.checkpoint_path, 'results.jsonl'), 'a+') as f:  # undefined metrics: null
            f.write(json.dumps(json_safe(metrics), allow_nan=False) + '\n')
    if args.wandb:
        import wandb
        wandb.log({**log_data, 'epoch': epoch})
