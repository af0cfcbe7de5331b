"""Weights for rank models: full checkpoints of a family, and base CLIP weights for the towers.

OpenCLIP's own ``load_checkpoint`` reads and converts the file (safetensors, ``.npz``, DDP prefixes,
position-embedding resizing, ...) and ends with ``model.load_state_dict``; a rank model's
``load_state_dict`` is ``load_rank_state_dict`` below, which decides what the state dict is:

* a full checkpoint (has keys under the family's ``fresh_state_prefixes``, e.g. one saved by the
  official training code or by OpenCLIP's loop): every key must match (``strict``);
* base CLIP weights (a pretrained tag of the base model, or such a file): the towers load, the family's
  own parts start fresh, and the log says which.

Anything that does not fit raises ``CheckpointMismatchError`` naming the file, the key and both shapes.
"""
import contextlib
import contextvars
import logging
from collections import namedtuple

from torch import nn

from ..data.table import preview

_logger = logging.getLogger(__name__)

LoadReport = namedtuple('LoadReport', ['missing_keys', 'unexpected_keys', 'fresh_keys', 'full_checkpoint'])

# The file being loaded, for error messages (set around OpenCLIP's load_checkpoint by the hook).
_source = contextvars.ContextVar('open_clip_rank_checkpoint_source', default='the state dict')


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model config."""


@contextlib.contextmanager
def checkpoint_source(path):
    token = _source.set(str(path))
    try:
        yield
    finally:
        _source.reset(token)


def _summarise_prefixes(keys, depth=2):
    """'adapter.*, visual.trunk.head.*' rather than hundreds of key names."""
    prefixes = []
    for key in keys:
        prefix = '.'.join(key.split('.')[:depth]) + ('.*' if key.count('.') >= depth else '')
        if prefix not in prefixes:
            prefixes.append(prefix)
    return ', '.join(prefixes)


def strip_module_prefix(state_dict):
    """Remove DDP/DataParallel ``module.`` prefixes wherever they are."""
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in state_dict.items()}


def _refit(source, detail):
    return CheckpointMismatchError(
        f"{source} does not fit this model: {detail}. The checkpoint was made for another model config; "
        f"build the model with the config it was trained with.")


def _check_shapes(expected, state_dict, source):
    mismatched = [(k, tuple(expected[k].shape), tuple(v.shape))
                  for k, v in state_dict.items() if k in expected and expected[k].shape != v.shape]
    if mismatched:
        key, want, found = mismatched[0]
        more = f" (+{len(mismatched) - 1} more mismatched keys)" if len(mismatched) > 1 else ''
        raise _refit(source, f"'{key}' expects shape {want}, checkpoint has {found}{more}")


def _check_base_weights(tower_keys, state_dict, source):
    loaded = [k for k in tower_keys if k in state_dict]
    if len(loaded) < len(tower_keys) / 2:
        raise CheckpointMismatchError(
            f"{source} matches only {len(loaded)} of {len(tower_keys)} tower weights of this model "
            f"(missing e.g. {preview([k for k in tower_keys if k not in state_dict])}); "
            f"it is not a checkpoint for this model's base architecture.")


def load_rank_checkpoint(openclip_load_checkpoint, model, checkpoint_path, strict=True, weights_only=True,
                         device='cpu'):
    """OpenCLIP's ``load_checkpoint`` on a rank model, with the file named in every mismatch error."""
    with checkpoint_source(checkpoint_path):  # OpenCLIP's loader ends in the rank model's load_state_dict
        with explaining_mismatch(model, checkpoint_path, weights_only=weights_only, device=device):
            return openclip_load_checkpoint(model, checkpoint_path, strict=strict, weights_only=weights_only,
                                            device=device)


@contextlib.contextmanager
def explaining_mismatch(model, checkpoint_path, **load_kwargs):
    """OpenCLIP's conversions fail on some mismatches before any key is compared (an assert on a text width;
    ``model.logit_bias.ndim`` on a model without one): re-read the raw file and name the first mismatched key
    instead; re-raise if the mismatch is not the cause."""
    try:
        yield
    except CheckpointMismatchError:
        raise
    except (AssertionError, RuntimeError, AttributeError) as error:
        from open_clip.factory import load_state_dict
        try:
            raw = strip_module_prefix(load_state_dict(checkpoint_path, **load_kwargs))
        except Exception:
            raise error
        expected = model.state_dict()
        missing_bias = 'logit_bias' in raw and 'logit_bias' not in expected
        if missing_bias:
            raise _refit(str(checkpoint_path), "it has 'logit_bias' (a SigLIP-style model, init_logit_bias in its "
                                               "config), this model has none") from None
        _check_shapes(expected, raw, str(checkpoint_path))
        raise


def _kept_timm_tower_keys(model, missing):
    """A timm image tower paired with another model's text tower (e.g. vgg16 + CLIP RN50 text, OrdinalCLIP's
    MORPH setup): base CLIP weights hold none of its keys, so it keeps what timm gave it."""
    from open_clip.timm_model import TimmModel
    if not isinstance(getattr(model, 'visual', None), TimmModel):
        return []
    tower = [k for k in missing if k.startswith('visual.')]
    all_tower = [k for k in model.state_dict() if k.startswith('visual.')]
    return tower if len(tower) == len(all_tower) else []


def load_rank_state_dict(model, state_dict, strict: bool = True, assign: bool = False) -> LoadReport:
    """``model.load_state_dict`` of rank models (see the module docstring)."""
    source = _source.get()
    state_dict = strip_module_prefix(state_dict)
    fresh_prefixes = model.fresh_state_prefixes
    full = any(k.startswith(fresh_prefixes) for k in state_dict)
    expected = model.state_dict()
    _check_shapes(expected, state_dict, source)
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if full:
        if strict and (missing or unexpected):
            parts = [f"{what} keys: {preview(keys)}" for what, keys in (('missing', missing), ('unexpected', unexpected))
                     if keys]
            raise _refit(source, '; '.join(parts))
        fresh, kept = [], []
    else:
        kept = _kept_timm_tower_keys(model, missing)
        _check_base_weights([k for k in expected if not k.startswith(fresh_prefixes) and k not in kept],
                            state_dict, source)
        fresh = [k for k in missing if k not in kept]
    nn.Module.load_state_dict(model, state_dict, strict=False, assign=assign)
    if not full:
        model.reset_fresh_parameters()
    if kept:
        _logger.info(f"Image tower: {len(kept)} weights not in {source} keep their timm initialisation "
                     f"(timm's pretrained weights when vision_cfg.timm_model_pretrained / --pretrained-image is set).")
    if fresh:
        _logger.info(f"Loaded base weights from {source}; {len(fresh)} parameters start fresh: "
                     f"{_summarise_prefixes(fresh)}.")
    if unexpected:
        _logger.info(f"{len(unexpected)} weights in {source} are not used by this model: "
                     f"{_summarise_prefixes(unexpected)}.")
    return LoadReport(missing, unexpected, fresh, full)
