"""Validation of rank models inside OpenCLIP's training loop (``--val-data`` of a family's sample type).

Runs on the master process over the whole validation set exactly once, on OpenCLIP's validation
schedule (like its own ``evaluate``, which also evaluates unsharded on rank 0), through the rank-model
protocol only, and reports to the log, tensorboard, wandb and ``results.jsonl``, as OpenCLIP reports
its own validation metrics:

* rank data: per-category and mean SRCC, KRCC, PLCC, MAE and pairwise accuracy of ``rank_scores``;
* ordinal data: MAE and accuracy by expectation and by argmax, the learned prototypes' ordinality,
  and two pictures per evaluation under ``logs/<name>/plots/`` (prototype similarity, predicted vs true).
"""
import json
import logging
import os

import torch

from .compat import openclip_evaluates_val
from .metrics import ordinal_metrics, prototype_ordinality, ranking_metrics
from .models.base import unwrap

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
        from .registry import SAMPLE_TYPES
        info = data['val']
        metrics.update(SAMPLE_TYPES[info.sample_type].validate(model, info, args, epoch=epoch))
    if not metrics:
        return metrics
    metrics = {'epoch': epoch, **metrics}
    _logger.info(f"Eval Epoch: {epoch} " + "\t".join(f"{k}: {v:.4f}" for k, v in metrics.items()))
    _report(metrics, epoch, args, tb_writer)
    return metrics


def ranking_validation(model, info, args, epoch=None) -> dict:
    """Per-category and mean ranking metrics of the model's scores on the validation set."""
    from open_clip.model import get_input_dtype
    from open_clip_train.precision import get_autocast
    device = torch.device(args.device)
    model.eval()
    autocast = get_autocast(args.precision, device_type=device.type)
    scores, targets, category_ids = predict(model, info.dataloader, device, autocast, get_input_dtype(args.precision))
    names = info.table.category_names
    return ranking_metrics(scores.numpy(), targets.numpy(), [names[i] for i in category_ids.tolist()])


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
    from open_clip.model import get_input_dtype
    from open_clip_train.precision import get_autocast
    device = torch.device(args.device)
    model.eval()
    autocast = get_autocast(args.precision, device_type=device.type)
    expected, argmax, labels = predict_ordinal(model, info.dataloader, device, autocast,
                                               get_input_dtype(args.precision))
    metrics = ordinal_metrics(expected.numpy(), argmax.numpy(), labels.numpy())
    with torch.inference_mode():
        prototypes = unwrap(model).rank_prototypes().float().cpu().numpy()
    metrics['ordinality'] = prototype_ordinality(prototypes)
    if args.save_logs and epoch is not None:
        from .plots import confusion_png, prototype_similarity_png
        folder = os.path.join(os.path.dirname(args.checkpoint_path), 'plots')
        prototype_similarity_png(prototypes, os.path.join(folder, f'epoch_{epoch}_prototype_similarity.png'),
                                 metrics['ordinality'])
        confusion_png(labels.numpy(), argmax.numpy(), info.table.num_ranks,
                      os.path.join(folder, f'epoch_{epoch}_predicted_vs_true.png'))
    return metrics


def _report(metrics, epoch, args, tb_writer):
    log_data = {f'val/{name}': value for name, value in metrics.items()}
    if args.save_logs:
        if tb_writer is not None:
            for name, value in log_data.items():
                tb_writer.add_scalar(name, value, epoch)
        with open(os.path.join(args.checkpoint_path, 'results.jsonl'), 'a+') as f:
            f.write(json.dumps(metrics) + '\n')
    if args.wandb:
        import wandb
        wandb.log({**log_data, 'epoch': epoch})
