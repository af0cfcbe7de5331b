"""Rank images with a trained rank model: the Python API behind ``python -m open_clip_rank.rank``.

Speaks only the rank-model protocol (``models/base.py``), so it ranks with any family's model.
``score_images`` runs every image tower pass once per batch and every prompt's text tower once,
then the scores-only path for each (image, prompt): a pair head is never run. ``pairwise_scores``
optionally re-ranks a set with the pair head of models that have one, blockwise, from per-image
summaries, so thousands of images fit in memory. Imports no ``open_clip_train`` module.
"""
import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

import open_clip

from .data.transforms import rank_transforms
from .files.atomic import atomic_path
from .registry import FAMILIES, family_for_config, family_for_model

_logger = logging.getLogger(__name__)

ImageLike = Union[str, os.PathLike, Image.Image]


def default_device() -> torch.device:
    return torch.device('cuda' if torch.cuda.is_available() else 'cpu')


def _register_config_file(config_path) -> str:
    """An official ``model-config.json`` (or any model config file) becomes a named OpenCLIP config."""
    config_path = Path(config_path)
    if not config_path.is_file():
        raise FileNotFoundError(f"model config {config_path} does not exist.")
    try:
        cfg = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {config_path} is not valid JSON ({err}).")
    cfg = cfg.get('model_cfg', cfg)  # open_clip_config.json wraps the model config
    cfg.pop('model_version', None)  # the official inference script passes it beside the config
    if family_for_config(cfg) is None:
        keys = [f.config_key for f in FAMILIES.values()]
        raise ValueError(f"model config {config_path} has none of {keys}: it is not a rank-model config.")
    folder = Path(tempfile.mkdtemp(prefix='open_clip_rank_cfg_'))
    name = f'file-{config_path.stem}'
    (folder / f'{name}.json').write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    return name


class UninitialisedModelError(ValueError):
    """A rank model would rank with random weights that nobody asked for."""


def _create(name, checkpoint_path, device, precision):
    """OpenCLIP's model and transforms with ``checkpoint_path`` loaded, however the model is named.

    A built-in or registered name takes the file as ``pretrained``. OpenCLIP ignores ``pretrained`` for
    ``local-dir:`` and ``hf-hub:`` names (it loads their own weights, or none); there the model is built
    without them and the checkpoint loaded through the same ``open_clip.load_checkpoint``.
    """
    from .integration.compat import split_model_name
    schema, _ = split_model_name(name)
    if checkpoint_path is None or schema is None:
        return open_clip.create_model_and_transforms(name, pretrained=checkpoint_path, precision=precision,
                                                     device=device)
    net, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
        name, precision=precision, device=device, load_weights=False)
    open_clip.load_checkpoint(net, checkpoint_path)
    return net, preprocess_train, preprocess_val


def load_rank_model(model: Optional[str] = None, config_path=None, checkpoint_path=None, device=None,
                    precision: str = 'fp32', random_weights: bool = False):
    """-> (model in eval mode, image transform (resize, no crop), tokenizer).

    ``checkpoint_path`` is loaded whichever way the model is named: a built-in or registered name,
    ``local-dir:DIR`` or ``hf-hub:ORG/REPO`` (the checkpoint replaces the source's own weights) or
    ``config_path``. Without a checkpoint, the weights come from the ``local-dir:`` / ``hf-hub:`` source; a
    rank model left with no loaded weights at all raises ``UninitialisedModelError`` unless
    ``random_weights=True`` asks for random weights explicitly.
    """
    from .files.checkpoints import base_weights_from, check_readable, loaded_from
    from .integration.start_checks import check_model_name
    if (model is None) == (config_path is None):
        raise ValueError("give exactly one of a model name (--model) or a model config file (--config-path).")
    if random_weights and checkpoint_path is not None:
        raise ValueError("random weights were asked for (--random-weights) together with a checkpoint; "
                         "give one of them.")
    if checkpoint_path is not None:
        if not os.path.isfile(checkpoint_path):
            raise FileNotFoundError(f"checkpoint {checkpoint_path} does not exist.")
        check_readable(checkpoint_path, fix='Pass a complete checkpoint (--checkpoint-path).')
    if model is not None:
        check_model_name(model)
    name = model if model is not None else _register_config_file(config_path)
    from .integration.compat import split_model_name
    no_weights = UninitialisedModelError(
        f"model {name} holds no trained weights (no checkpoint given, none in its source), so it would rank with "
        f"random ones: pass --checkpoint-path CKPT (checkpoint_path=), or --random-weights (random_weights=True) "
        f"to rank with random weights on purpose.")
    if checkpoint_path is None and not random_weights and split_model_name(name)[0] is None:
        from .registry import family_for_model_name
        if family_for_model_name(name) is not None:
            raise no_weights  # a plain name only has weights from a checkpoint: no need to build the model first
    device = torch.device(device) if device is not None else default_device()
    net, _, preprocess_val = _create(name, checkpoint_path, device, precision)
    family = family_for_model(net)
    if family is None:
        keys = [f.config_key for f in FAMILIES.values()]
        raise ValueError(f"model {name} is not a rank model (its config has none of {keys}).")
    if loaded_from(net) is None:
        base = base_weights_from(net)
        if not random_weights:
            if base is not None:
                raise UninitialisedModelError(
                    f"{base} holds base CLIP weights only: the {family.name} model's own parameters would rank "
                    f"with random values. Pass a checkpoint trained with this plugin (--checkpoint-path)"
                    + ("." if checkpoint_path is not None else f", or --random-weights (random_weights=True) to "
                       f"rank with untrained {family.name} parameters on purpose."))
            raise no_weights
        _logger.warning(f"Ranking with random weights (asked for): model {name} loaded "
                        f"{'base weights only from ' + base if base else 'no checkpoint'}.")
    # the family's evaluation preprocessing, as in training
    transform = rank_transforms(preprocess_val)[1] if family.square_resize else preprocess_val
    return net.eval(), transform, open_clip.get_tokenizer(name)


def _open(image: ImageLike) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert('RGB')
    with Image.open(image) as img:
        return img.convert('RGB')


def load_images(images: Sequence[ImageLike], transform):
    """-> (tensors of the readable images, their indices, [(index, reason)] of the unreadable ones)."""
    tensors, kept, skipped = [], [], []
    for index, image in enumerate(images):
        try:
            tensors.append(transform(_open(image)))
            kept.append(index)
        except Exception as err:
            skipped.append((index, f'{type(err).__name__}: {err}'))
            _logger.warning(f"Skipping unreadable image {image} ({type(err).__name__}: {err}).")
    return tensors, kept, skipped


class _Batches:
    """Decodes images batch by batch so a large folder never sits in memory as tensors."""

    def __init__(self, images, transform, batch_size):
        self.images, self.transform, self.batch_size = images, transform, batch_size

    def __len__(self):
        return (len(self.images) + self.batch_size - 1) // self.batch_size

    def __iter__(self):
        for start in range(0, len(self.images), self.batch_size):
            chunk = self.images[start:start + self.batch_size]
            tensors, kept, skipped = load_images(chunk, self.transform)
            yield (torch.stack(tensors) if tensors else None, [start + k for k in kept],
                   [(start + i, why) for i, why in skipped])


def _progress(iterable, enabled, desc):
    if not enabled:
        return iterable
    from tqdm import tqdm
    return tqdm(iterable, desc=desc, unit='batch')


@torch.inference_mode()
def score_images(model, images: Sequence[ImageLike], prompts: Union[str, Sequence[str]], transform, tokenizer,
                 batch_size: int = 64, device=None, progress: bool = False, autocast_dtype=None):
    """Scores [num_images, num_prompts] (NaN for unreadable images) and the list of skipped (index, reason).

    ``prompts`` is one prompt or a list of prompts; every image is scored under each. For one prompt per
    image (a CSV's rows) use ``score_rows``.
    """
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompt_states = model.encode_prompts(tokenizer(prompts).to(device))  # once per prompt
    scores = torch.full((len(images), len(prompts)), float('nan'))
    skipped = []
    autocast = torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    for batch, kept, bad in _progress(_Batches(list(images), transform, batch_size), progress, 'scoring'):
        skipped += bad
        if batch is None:
            continue
        with autocast:
            image_tokens = model.encode_image_tokens(batch.to(device))  # once per image
            for t in range(len(prompts)):
                scores[kept, t] = model.score_tokens(image_tokens, prompt_states[t:t + 1]).float().cpu()
    return scores, skipped


@torch.inference_mode()
def score_rows(model, images: Sequence[ImageLike], prompts: Sequence[str], transform, tokenizer,
               batch_size: int = 64, device=None, progress: bool = False):
    """One prompt per image (CSV input: each row's own instruction). -> (scores [N], skipped)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    scores = torch.full((len(images),), float('nan'))
    skipped = []
    for batch, kept, bad in _progress(_Batches(list(images), transform, batch_size), progress, 'scoring'):
        skipped += bad
        if batch is None:
            continue
        texts = tokenizer([prompts[i] for i in kept]).to(device)
        scores[kept] = model.rank_scores(batch.to(device), texts).float().cpu()
    return scores, skipped


@torch.inference_mode()
def pairwise_scores(model, images: Sequence[ImageLike], prompt: str, transform, tokenizer, batch_size: int = 64,
                    block_size: int = 256, device=None, progress: bool = False):
    """Pair-head ranking of a set: score_i = mean over j of (P(i > j) + 1 - P(j > i)) / 2.

    Uses every pair's evidence instead of one absolute score per image; it helps most when the
    regression head is poorly calibrated across images (e.g. a checkpoint trained with the dual-head
    loss and few regression targets). Cost grows with N^2 (blockwise, N x block x D memory).
    -> (scores [N] in [0, 1], NaN for unreadable images; skipped).
    """
    if not model.supports_pairwise:
        raise ValueError(f"this {model.family_name} model has no pair head; rank without --pairwise.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompt_state = model.encode_prompts(tokenizer([prompt]).to(device))
    summaries, kept_all, skipped = [], [], []
    for batch, kept, bad in _progress(_Batches(list(images), transform, batch_size), progress, 'encoding'):
        skipped += bad
        if batch is None:
            continue
        summaries.append(model.pair_summaries(model.encode_image_tokens(batch.to(device)), prompt_state))
        kept_all += kept
    scores = torch.full((len(images),), float('nan'))
    if not kept_all:
        return scores, skipped
    summaries = tuple(torch.cat(parts) for parts in zip(*summaries))
    n = len(kept_all)
    row_sums = torch.zeros(n, device=device)  # sum_j P(i > j)
    col_sums = torch.zeros(n, device=device)  # sum_i P(i > j), indexed by j
    for start in range(0, n, block_size):
        block = tuple(part[start:start + block_size] for part in summaries)
        probs = torch.sigmoid(model.pair_logits_between(block, summaries).float())  # [block, n]
        row_sums[start:start + block_size] += probs.sum(dim=1)
        col_sums += probs.sum(dim=0)
    # mean over j != i of (P(i > j) + 1 - P(j > i)) / 2; the diagonal terms cancel
    scores[kept_all] = ((row_sums - col_sums + n - 1) / (2 * max(n - 1, 1))).cpu()
    return scores, skipped


@torch.inference_mode()
def predict_images(model, images: Sequence[ImageLike], transform, prompt: Optional[str] = None, tokenizer=None,
                   batch_size: int = 64, device=None, progress: bool = False):
    """Every per-image prediction the model's family makes (``rank_predictions``), under one prompt, or none
    for models whose prompts are learned (``needs_prompt`` False, e.g. ordinal models).

    -> ({name: tensor [N] or [N, ...]} with NaN rows for unreadable images, skipped). Ordinal models give
    ``score`` (= ``expected_rank``), ``expected_rank``, ``predicted_rank`` and ``probs`` [N, R].
    """
    if model.needs_prompt and (prompt is None or tokenizer is None):
        raise ValueError(f"{model.family_name} models rank by an instruction: give a prompt (and the tokenizer).")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prompt_state = model.encode_prompts(tokenizer([prompt]).to(device) if model.needs_prompt else None)
    outputs, skipped = {}, []
    for batch, kept, bad in _progress(_Batches(list(images), transform, batch_size), progress, 'predicting'):
        skipped += bad
        if batch is None:
            continue
        predictions = model.rank_predictions(model.encode_image_tokens(batch.to(device)), prompt_state)
        for name, value in predictions.items():
            if name not in outputs:
                outputs[name] = torch.full((len(images), *value.shape[1:]), float('nan'))
            outputs[name][kept] = value.float().cpu()
    return outputs, skipped


def export_prototypes(model, path) -> torch.Tensor:
    """Write an ordinal model's learned rank prototypes [R, D] to a small file (atomically): with them
    (``load_prototypes``) inference runs the image tower only."""
    prototypes = model.rank_prototypes()
    if prototypes is None:
        raise ValueError(f"{model.family_name} models have no rank prototypes to export.")
    payload = {'prototypes': prototypes.detach().float().cpu(), 'family': model.family_name,
               'num_ranks': int(prototypes.shape[0])}
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return payload['prototypes']


def load_prototypes(model, path) -> torch.Tensor:
    """Freeze ``model``'s prototypes to those exported in ``path`` (one clear error when they do not fit)."""
    try:
        payload = torch.load(path, map_location='cpu', weights_only=True)
        prototypes = payload['prototypes']
    except FileNotFoundError:
        raise FileNotFoundError(f"prototype file {path} does not exist.")
    except Exception as err:
        raise ValueError(f"{path} is not a prototype file written by export_prototypes ({type(err).__name__}: {err}).")
    try:  # the protocol refuses families without prototypes
        return model.freeze_prototypes(prototypes)
    except ValueError as err:
        raise ValueError(f"{path}: {err}")


def ranks_from_scores(scores: torch.Tensor) -> torch.Tensor:
    """1 = highest score; NaN scores rank last."""
    filled = torch.nan_to_num(scores.float(), nan=float('-inf'))
    order = torch.argsort(filled, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(1, len(order) + 1)
    return ranks


def rank_images(model, images: Sequence[ImageLike], prompt: str, transform=None, tokenizer=None, **kwargs):
    """Order ``images`` by ``prompt``: a list of dicts (image, score, rank), best first.

    Unreadable images are never ranked: they follow the ranked ones with ``score`` and ``rank`` None and
    the reason under ``skipped``.
    """
    if transform is None or tokenizer is None:
        raise ValueError("pass the transform and tokenizer from load_rank_model().")
    scores, skipped = score_images(model, images, prompt, transform, tokenizer, **kwargs)
    reasons = dict(skipped)
    kept = [i for i in range(len(images)) if i not in reasons]
    ranks = ranks_from_scores(scores[kept, 0])
    out = [{'image': images[i], 'score': float(scores[i, 0]), 'rank': int(rank)} for i, rank in zip(kept, ranks)]
    out.sort(key=lambda r: r['rank'])
    return out + [{'image': images[i], 'score': None, 'rank': None, 'skipped': why} for i, why in skipped]
