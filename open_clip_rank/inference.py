"""Rank images with a trained rank model: the Python API behind ``python -m open_clip_rank.rank``.

Speaks only the rank-model protocol (``models/base.py``), so it ranks with any family's model.
``score_images`` runs every image tower pass once per batch and every prompt's text tower once,
then the scores-only path for each (image, prompt): a pair head is never run. ``pairwise_scores``
optionally re-ranks a set with the pair head of models that have one, blockwise, from per-image
summaries, so thousands of images fit in memory. Imports no ``open_clip_train`` module.

Nothing non-finite is ranked: an image whose score (or any other prediction) is NaN or infinite is listed as
skipped with the reason, as an unreadable image is. Images are cast to the image tower's dtype
(``precision='bf16'|'fp16'``); ``'amp'`` / ``'amp_bf16'`` run the fp32 model under autocast, as OpenCLIP's
validation does.
"""
import contextlib
import json
import logging
import math
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


def resolve_device(device=None) -> torch.device:
    """``device`` as a torch device that this machine has (None: cuda when available, else cpu).

    An unknown device string, or a device torch cannot use here (``cuda`` without a CUDA device, ``cuda:3`` on a
    machine with one GPU), is a one-line ``ValueError`` instead of torch's traceback at the first tensor moved.
    """
    if device is None:
        return default_device()
    if isinstance(device, torch.device):
        parsed = device
    else:
        try:
            parsed = torch.device(device)
        except (RuntimeError, TypeError, ValueError) as err:
            raise ValueError(f"unknown device {device!r} ({str(err).splitlines()[0]}): use --device cpu, cuda or "
                             f"cuda:N (device=), or omit --device (cuda when available, else cpu).") from None
    fix = "use --device cpu (device='cpu'), or omit --device (cuda when available, else cpu)"
    if parsed.type == 'cuda':
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} was asked for, but torch sees no CUDA device (torch "
                             f"{torch.__version__}, built with CUDA {torch.version.cuda or 'none'}): {fix}.")
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(f"device {str(device)!r} was asked for, but torch sees {count} CUDA device(s) "
                             f"(cuda:0 to cuda:{count - 1}): pick one of them, or {fix}.")
    elif parsed.type != 'cpu':
        backend = getattr(torch, parsed.type, None)  # torch.mps, torch.xpu, ...: each has is_available()
        available = getattr(backend, 'is_available', None)
        if available is None or not available():
            raise ValueError(f"device {str(device)!r} was asked for, but torch has no usable {parsed.type} device "
                             f"here: {fix}.")
    return parsed


# --precision: OpenCLIP's names. 'bf16' / 'fp16' cast the model's weights (OpenCLIP's mixed low precision), so
# images are cast to the image tower's dtype; 'amp' / 'amp_bf16' keep fp32 weights and run under torch.autocast,
# as OpenCLIP's training and validation do (open_clip_train.precision.get_autocast).
PRECISIONS = ('fp32', 'bf16', 'fp16', 'amp', 'amp_bf16', 'amp_bfloat16', 'pure_bf16', 'pure_fp16')
AUTOCAST_DTYPES = {'amp': torch.float16, 'amp_bf16': torch.bfloat16, 'amp_bfloat16': torch.bfloat16}


def image_dtype(model) -> Optional[torch.dtype]:
    """The dtype images must have for the model's image tower: its low precision when its weights were cast
    (``--precision bf16|fp16``), else None (images stay float32; autocast handles ``amp``)."""
    tower = getattr(model, 'visual', model)
    dtypes = {p.dtype for p in tower.parameters()}
    return next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), None)


def autocast_for(model, device, autocast_dtype=None):
    """torch.autocast for ``autocast_dtype``, else for the precision ``load_rank_model`` was given (``amp``...)."""
    dtype = autocast_dtype if autocast_dtype is not None else getattr(model, 'rank_autocast_dtype', None)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


NON_FINITE_CAUSE = "the model's weights or inputs produce non-finite values (a damaged checkpoint, fp16 overflow)"


def non_finite_reason(name: str, value: float) -> str:
    """Why an image is skipped when its ``name`` prediction is ``value`` (nan or +-inf)."""
    kind = 'nan' if math.isnan(value) else ('inf' if value > 0 else '-inf')
    return f"{name} is {kind}: {NON_FINITE_CAUSE}"


def _skip_non_finite(outputs: dict, skipped: list, images) -> list:
    """Images with a non-finite value in any of ``outputs`` ({name: [N] or [N, ...]} float tensors, NaN rows for
    the already skipped) join ``skipped`` with the reason; their rows become NaN. -> skipped, sorted by index."""
    already = {i for i, _ in skipped}
    found = []
    for name, values in outputs.items():
        if not values.is_floating_point() or not len(values):
            continue
        finite = torch.isfinite(values.reshape(len(values), -1)).all(dim=1)
        for i in (~finite).nonzero().flatten().tolist():
            if i not in already:
                already.add(i)
                row = values[i].reshape(-1)
                found.append((i, non_finite_reason(name, row[~torch.isfinite(row)][0].item())))
    for i, _ in found:
        for values in outputs.values():
            if values.is_floating_point():
                values[i] = float('nan')
    if found:
        i, why = found[0]
        _logger.warning(f"{len(found)} image(s) skipped, not ranked: non-finite predictions (first: {images[i]}: "
                        f"{why}).")
    return sorted(skipped + found, key=lambda s: s[0])


def _refuse_prompt(model, what):
    """Models whose prompts are learned (``needs_prompt`` False) take no instruction: one line, no silent misuse."""
    if not model.needs_prompt:
        raise ValueError(f"{model.family_name} models take no prompt (their prompts are learned): {what}")


def _register_config_file(config_path) -> str:
    """An official ``model-config.json`` (or any model config file) becomes a named OpenCLIP config."""
    from .integration.compat import read_model_config_file
    config_path = Path(config_path)
    cfg = read_model_config_file(config_path)
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
    try:
        if checkpoint_path is None or schema is None:
            return open_clip.create_model_and_transforms(name, pretrained=checkpoint_path, precision=precision,
                                                         device=device)
        net, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, precision=precision, device=device, load_weights=False)
    except AttributeError as err:
        if precision not in ('bf16', 'fp16'):
            raise
        # OpenCLIP 3.3's convert_weights_to_lp assumes a text projection parameter; a tower whose projection is a
        # Linear (proj_bias) fails there, before any weight loads
        raise ValueError(f"OpenCLIP cannot cast model {name} to {precision} ({type(err).__name__}: {err}): use "
                         f"--precision amp_bf16 or amp (its fp32 weights under autocast), or fp32.") from None
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

    ``device``: checked before anything is built (``resolve_device``). ``precision``: one of ``PRECISIONS``;
    ``'amp'`` / ``'amp_bf16'`` keep fp32 weights and the scoring functions below run them under autocast (the
    model remembers it as ``rank_autocast_dtype``), as OpenCLIP's validation does.
    """
    from .files.checkpoints import base_weights_from, check_readable, loaded_from
    from .integration.start_checks import check_model_name
    if (model is None) == (config_path is None):
        raise ValueError("give exactly one of a model name (--model) or a model config file (--config-path).")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    device = resolve_device(device)
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
    net, _, preprocess_val = _create(name, checkpoint_path, device, precision)
    net.rank_autocast_dtype = AUTOCAST_DTYPES.get(precision)  # read by the scoring functions (_autocast)
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
    """8-bit RGB, oriented, as training decodes images (``files/images.py:open_rgb``): a truncated file is
    unreadable unless inside ``files.images.truncated_images()`` (the rank CLI's ``--load-truncated-images``)."""
    from .files.images import open_rgb
    return open_rgb(image)


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
    """Scores [num_images, num_prompts] and the list of skipped (index, reason), sorted by index.

    ``prompts`` is one prompt or a list of prompts; every image is scored under each. For one prompt per
    image (a CSV's rows) use ``score_rows``. Skipped: unreadable images and images with a non-finite score under
    any prompt; their rows are NaN. ``autocast_dtype``: run under torch.autocast (default: as loaded, ``amp``).
    """
    _refuse_prompt(model, "rank with predict_images(model, images, transform), without a prompt.")
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    input_dtype = image_dtype(model)
    scores = torch.full((len(images), len(prompts)), float('nan'))
    skipped = []
    autocast = autocast_for(model, device, autocast_dtype)
    with autocast:
        prompt_states = model.encode_prompts(tokenizer(prompts).to(device))  # once per prompt; tokens stay integer
    for batch, kept, bad in _progress(_Batches(list(images), transform, batch_size), progress, 'scoring'):
        skipped += bad
        if batch is None:
            continue
        with autocast:
            image_tokens = model.encode_image_tokens(batch.to(device=device, dtype=input_dtype))  # once per image
            for t in range(len(prompts)):
                scores[kept, t] = model.score_tokens(image_tokens, prompt_states[t:t + 1]).float().cpu()
    return scores, _skip_non_finite({'score': scores}, skipped, images)


@torch.inference_mode()
def score_rows(model, images: Sequence[ImageLike], prompts: Sequence[str], transform, tokenizer,
               batch_size: int = 64, device=None, progress: bool = False, autocast_dtype=None):
    """One prompt per image (CSV input: each row's own instruction). -> (scores [N], skipped).

    Skipped (index, reason), sorted by index: unreadable images and non-finite scores (NaN in ``scores``).
    """
    _refuse_prompt(model, "rank with predict_images(model, images, transform), without prompts.")
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    input_dtype = image_dtype(model)
    scores = torch.full((len(images),), float('nan'))
    skipped = []
    autocast = autocast_for(model, device, autocast_dtype)
    for batch, kept, bad in _progress(_Batches(list(images), transform, batch_size), progress, 'scoring'):
        skipped += bad
        if batch is None:
            continue
        texts = tokenizer([prompts[i] for i in kept]).to(device)
        with autocast:
            scores[kept] = model.rank_scores(batch.to(device=device, dtype=input_dtype), texts).float().cpu()
    return scores, _skip_non_finite({'score': scores}, skipped, images)


@torch.inference_mode()
def pairwise_scores(model, images: Sequence[ImageLike], prompt: str, transform, tokenizer, batch_size: int = 64,
                    block_size: int = 256, device=None, progress: bool = False, autocast_dtype=None):
    """Pair-head ranking of a set: score_i = mean over j of (P(i > j) + 1 - P(j > i)) / 2.

    Uses every pair's evidence instead of one absolute score per image; it helps most when the
    regression head is poorly calibrated across images (e.g. a checkpoint trained with the dual-head
    loss and few regression targets). Cost grows with N^2 (blockwise, N x block x D memory).
    -> (scores [N] in [0, 1]; skipped (index, reason), sorted by index: unreadable images and images whose pair
    summaries or pair score are non-finite, NaN in ``scores``; they take no part in the others' scores).
    """
    if not model.supports_pairwise:
        raise ValueError(f"this {model.family_name} model has no pair head; rank without --pairwise.")
    _refuse_prompt(model, "rank without a prompt.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    input_dtype = image_dtype(model)
    autocast = autocast_for(model, device, autocast_dtype)
    with autocast:
        prompt_state = model.encode_prompts(tokenizer([prompt]).to(device))
    summaries, kept_all, skipped = [], [], []
    for batch, kept, bad in _progress(_Batches(list(images), transform, batch_size), progress, 'encoding'):
        skipped += bad
        if batch is None:
            continue
        with autocast:
            tokens = model.encode_image_tokens(batch.to(device=device, dtype=input_dtype))
            summaries.append(model.pair_summaries(tokens, prompt_state))
        kept_all += kept
    scores = torch.full((len(images),), float('nan'))
    if kept_all:  # an image with non-finite summaries would turn every other image's mean into NaN: left out
        summaries = tuple(torch.cat(parts) for parts in zip(*summaries))
        per_image = torch.full((len(images),), float('nan'))
        finite = torch.stack([torch.isfinite(part.reshape(len(part), -1)).all(dim=1) for part in summaries]).all(0)
        per_image[kept_all] = torch.where(finite.cpu(), 0.0, float('nan'))
        skipped = _skip_non_finite({'pair summary': per_image}, skipped, images)
        keep = finite.nonzero().flatten()
        summaries = tuple(part[keep] for part in summaries)
        kept_all = [kept_all[i] for i in keep.tolist()]
    if not kept_all:
        return scores, skipped
    n = len(kept_all)
    row_sums = torch.zeros(n, device=device)  # sum_j P(i > j)
    col_sums = torch.zeros(n, device=device)  # sum_i P(i > j), indexed by j
    for start in range(0, n, block_size):
        block = tuple(part[start:start + block_size] for part in summaries)
        with autocast:
            logits = model.pair_logits_between(block, summaries)
        probs = torch.sigmoid(logits.float())  # [block, n]
        row_sums[start:start + block_size] += probs.sum(dim=1)
        col_sums += probs.sum(dim=0)
    # mean over j != i of (P(i > j) + 1 - P(j > i)) / 2; the diagonal terms cancel
    scores[kept_all] = ((row_sums - col_sums + n - 1) / (2 * max(n - 1, 1))).cpu()
    return scores, _skip_non_finite({'pairwise score': scores}, skipped, images)


@torch.inference_mode()
def predict_images(model, images: Sequence[ImageLike], transform, prompt: Optional[str] = None, tokenizer=None,
                   batch_size: int = 64, device=None, progress: bool = False, autocast_dtype=None):
    """Every per-image prediction the model's family makes (``rank_predictions``), under one prompt, or none
    for models whose prompts are learned (``needs_prompt`` False, e.g. ordinal models).

    -> ({name: tensor [N] or [N, ...]} with NaN rows for skipped images, skipped (index, reason): unreadable, or
    a non-finite value in any prediction). Ordinal models give ``score`` (= ``expected_rank``), ``expected_rank``,
    ``predicted_rank`` and ``probs`` [N, R]. A prompt given to a model that takes none is refused.
    """
    if model.needs_prompt and (prompt is None or tokenizer is None):
        raise ValueError(f"{model.family_name} models rank by an instruction: give a prompt (and the tokenizer).")
    if prompt is not None:
        _refuse_prompt(model, "call predict_images without one.")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    input_dtype = image_dtype(model)
    autocast = autocast_for(model, device, autocast_dtype)
    with autocast:
        prompt_state = model.encode_prompts(tokenizer([prompt]).to(device) if model.needs_prompt else None)
    outputs, skipped = {}, []
    for batch, kept, bad in _progress(_Batches(list(images), transform, batch_size), progress, 'predicting'):
        skipped += bad
        if batch is None:
            continue
        with autocast:
            predictions = model.rank_predictions(
                model.encode_image_tokens(batch.to(device=device, dtype=input_dtype)), prompt_state)
        for name, value in predictions.items():
            if name not in outputs:
                outputs[name] = torch.full((len(images), *value.shape[1:]), float('nan'))
            outputs[name][kept] = value.float().cpu()
    return outputs, _skip_non_finite(outputs, skipped, images)


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

    Unreadable images and images with a non-finite score are never ranked: they follow the ranked ones with
    ``score`` and ``rank`` None and the reason under ``skipped``.
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
