"""Load weights into rank-adapter models: official adapter checkpoints and base CLIP weights.

Two kinds of file reach ``open_clip.create_model(..., pretrained=...)`` for an adapter config:

* a full adapter checkpoint (has ``adapter.*`` keys), e.g. one saved by the official training code
  (``{"epoch", "name", "state_dict"}`` with DDP ``module.`` prefixes): every key must match;
* base CLIP weights (a pretrained tag of the base model, or such a file): the towers load, the
  adapter and any projection the base model lacks start fresh, and that is reported.

Anything that does not fit raises ``CheckpointMismatchError`` naming the key and both shapes.
"""
import logging
from collections import namedtuple

import torch

from open_clip.factory import load_state_dict
from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

from .model import FRESH_PREFIXES

_logger = logging.getLogger(__name__)

LoadReport = namedtuple('LoadReport', ['missing_keys', 'unexpected_keys', 'fresh_keys', 'full_checkpoint'])


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model config."""


def _preview(keys, limit=3):
    keys = list(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ''
    return ', '.join(keys[:limit]) + more


def strip_module_prefix(state_dict):
    """Remove DDP/DataParallel ``module.`` prefixes wherever they are."""
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def is_full_adapter_checkpoint(state_dict) -> bool:
    return any(k.startswith('adapter.') for k in state_dict)


def _adapt_base_state_dict(model, state_dict):
    """The same massaging OpenCLIP's ``load_checkpoint`` applies to base CLIP weights."""
    try:
        from open_clip.convert import convert_state_dict
        state_dict = convert_state_dict(model, state_dict)
    except ImportError:  # older OpenCLIP without third-party converters
        pass
    if 'positional_embedding' in state_dict and not hasattr(model, 'positional_embedding'):
        state_dict = convert_to_custom_text_state_dict(state_dict)
    for key in ('logit_scale', 'logit_bias'):
        param = getattr(model, key, None)
        if key in state_dict and param is not None and param.ndim != state_dict[key].ndim:
            state_dict[key] = state_dict[key].reshape(param.shape)
    if 'logit_bias' not in state_dict and getattr(model, 'logit_bias', None) is not None and 'logit_scale' in state_dict:
        state_dict['logit_bias'] = torch.zeros_like(state_dict['logit_scale'])
    resize_pos_embed(state_dict, model)
    resize_text_pos_embed(state_dict, model)
    return state_dict


def load_rank_state_dict(model, state_dict, source='checkpoint', strict=True) -> LoadReport:
    state_dict = strip_module_prefix(state_dict)
    full = is_full_adapter_checkpoint(state_dict)
    if not full:
        state_dict = _adapt_base_state_dict(model, state_dict)
    expected = model.state_dict()

    mismatched = [(k, tuple(expected[k].shape), tuple(v.shape))
                  for k, v in state_dict.items() if k in expected and expected[k].shape != v.shape]
    if mismatched:
        key, want, found = mismatched[0]
        more = f" (+{len(mismatched) - 1} more mismatched keys)" if len(mismatched) > 1 else ''
        raise CheckpointMismatchError(
            f"{source} does not fit this model: '{key}' expects shape {want}, checkpoint has {found}{more}. "
            f"The checkpoint was made for another model config; build the model with the config it was trained with.")

    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if full:
        if strict and (missing or unexpected):
            parts = []
            if missing:
                parts.append(f"missing keys: {_preview(missing)}")
            if unexpected:
                parts.append(f"unexpected keys: {_preview(unexpected)}")
            raise CheckpointMismatchError(
                f"{source} does not fit this model ({'; '.join(parts)}). "
                f"The checkpoint was made for another model config; build the model with the config it was trained with.")
        fresh = []
    else:
        tower_keys = [k for k in expected if not k.startswith(FRESH_PREFIXES)]
        loaded = [k for k in tower_keys if k in state_dict]
        if len(loaded) < len(tower_keys) / 2:
            raise CheckpointMismatchError(
                f"{source} matches only {len(loaded)} of {len(tower_keys)} tower weights of this model "
                f"(missing e.g. {_preview([k for k in tower_keys if k not in state_dict])}); "
                f"it is not a checkpoint for this model's base architecture.")
        fresh = missing

    model.load_state_dict(state_dict, strict=False)
    if fresh:
        _logger.info(f"Loaded base weights from {source}; {len(fresh)} parameters start fresh: "
                     f"{_summarise_prefixes(fresh)}.")
    if unexpected:
        _logger.info(f"{len(unexpected)} weights in {source} are not used by this model: "
                     f"{_summarise_prefixes(unexpected)}.")
    return LoadReport(missing, unexpected, fresh, full)


def _summarise_prefixes(keys, depth=2):
    """'adapter.*, visual.trunk.head.*' rather than hundreds of key names."""
    prefixes = []
    for key in keys:
        prefix = '.'.join(key.split('.')[:depth]) + ('.*' if key.count('.') >= depth else '')
        if prefix not in prefixes:
            prefixes.append(prefix)
    return ', '.join(prefixes)


def load_rank_checkpoint(model, checkpoint_path, strict=True, weights_only=True, device='cpu') -> LoadReport:
    """Drop-in for ``open_clip.load_checkpoint`` on rank-adapter models."""
    state_dict = load_state_dict(checkpoint_path, device=device, weights_only=weights_only)
    return load_rank_state_dict(model, state_dict, source=str(checkpoint_path), strict=strict)
