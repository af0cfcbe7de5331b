"""The Hugging Face folder a push uploads: written with OpenCLIP's own ``save_for_hf`` (``open_clip_config.json``,
``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``), from the model as the training run built it.

What the plugin adds to OpenCLIP's folder:

* the model config is the one the weights were trained with: a rank family's config key is kept (``hf-hub:`` and
  ``local-dir:`` build the family from the config, whatever the repo is called), a ``--config-path`` file is
  used as is, and the ``--force-*`` / ``--siglip`` overrides of the training run (its ``params.txt``) are applied;
* families that resize without cropping (``RankFamily.square_resize``) get that preprocessing in the config
  (``resize_mode: squash``, bicubic), so OpenCLIP's own transforms match training's;
* the built-in tokenizer writes no files and needs no network (``get_tokenizer('hf-hub:...')`` builds it from the
  config); Hugging Face tokenizers are saved with the model, as OpenCLIP does;
* a rank model without trained weights is refused, and the written folder is loaded back (``local-dir:``) and
  compared with the model (family, weights, outputs, tokens) before anything is pushed.

Everything family-specific comes from the registry; this module never names a family.
"""
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .. import registry
from ..integration.compat import config_as_built, read_model_config_file

PRECISIONS = ('fp32', 'fp16', 'bf16', 'pure_fp16', 'pure_bf16')  # the dtype of the weights written
WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pth')  # what OpenCLIP's local-dir:/hf-hub: loaders pick up
README = 'README.md'


class RoundTripError(ValueError):
    """The written folder does not load back into the same model."""


# --- the folder ----------------------------------------------------------------------------------------

class _ShipsWithOpenCLIP:
    """Stands in for OpenCLIP's built-in tokenizer in ``save_for_hf``: its vocabulary ships with OpenCLIP, so no file
    is written and nothing is fetched (``open_clip.get_tokenizer`` builds it from the config)."""

    def save_pretrained(self, directory):
        pass


def hf_preprocess_cfg(model, written: Optional[dict] = None) -> dict:
    """The ``preprocess_cfg`` of ``open_clip_config.json``: OpenCLIP's (``written``: what its ``save_for_hf``
    wrote), with the family's resizing where it has its own (resize to the square input without cropping, bicubic,
    as its training and the rank CLI do)."""
    cfg = dict(written or {})
    family = registry.family_for_model(model)
    if family is not None and family.square_resize:
        cfg.update(resize_mode='squash', interpolation='bicubic')
    return cfg


def check_config_family(model, model_config) -> None:
    """The config must select the model's family (its key) so that ``hf-hub:`` / ``local-dir:`` build that family
    back, whatever the repo or folder is called; a plain model's config must carry no family key."""
    from ..models.base import unwrap
    model_family = registry.family_for_model(model)
    config_family = registry.family_for_config(model_config)
    if model_family != config_family:
        have = f"the {config_family.name} key {config_family.config_key!r}" if config_family else 'no family key'
        want = (f"{model_family.name} (config key {model_family.config_key!r})" if model_family
                else f"a plain {type(unwrap(model)).__name__}")
        raise ValueError(f"the model config has {have}, but the model is {want}: a repo must carry the config the "
                         f"model was built from, or hf-hub:/local-dir: would build another model.")


def save_for_hf(model, tokenizer, model_config: dict, save_directory, safe_serialization='both',
                readme: Optional[str] = None) -> Path:
    """OpenCLIP's ``save_for_hf`` for any model, rank families included: weights, ``open_clip_config.json`` (the
    given ``model_config``, checked to select the model's family, and the family's preprocessing), the tokenizer's
    files (none for OpenCLIP's built-in tokenizer) and ``README.md`` when ``readme`` is given."""
    from open_clip.constants import HF_CONFIG_NAME

    from ..files.atomic import atomic_write
    from ..integration.compat import openclip_hub_writers
    from ..models.base import unwrap
    model = unwrap(model)
    check_config_family(model, model_config)
    openclip_save_for_hf, _ = openclip_hub_writers()
    folder = Path(save_directory)
    writer = tokenizer if hasattr(tokenizer, 'save_pretrained') else _ShipsWithOpenCLIP()
    openclip_save_for_hf(model, writer, model_config, folder, safe_serialization=safe_serialization)
    config_path = folder / HF_CONFIG_NAME
    config = json.loads(config_path.read_text(encoding='utf-8'))
    config['preprocess_cfg'] = hf_preprocess_cfg(model, config.get('preprocess_cfg'))
    with atomic_write(config_path, 'w', encoding='utf-8') as f:
        json.dump(config, f, indent=2)
    if readme is not None:
        with atomic_write(folder / README, 'w', encoding='utf-8') as f:
            f.write(readme)
    return folder


def check_round_trip(folder, model, tokenizer, precision: str = 'fp32') -> None:
    """Load ``folder`` back as ``local-dir:`` and compare it with ``model``: the same class (family), the same state
    dict, the same outputs on a fixed input (image and text towers, and a rank model's scores), the same tokens.
    Raises ``RoundTripError`` naming the first difference."""
    import open_clip
    import torch

    from ..models.base import unwrap
    name = f'local-dir:{folder}'
    model = unwrap(model).eval()
    loaded = open_clip.create_model(name, precision=precision, device='cpu').eval()
    if type(loaded) is not type(model):
        raise RoundTripError(f"{folder} loads as {type(loaded).__name__}, not {type(model).__name__}.")
    ours, theirs = model.state_dict(), loaded.state_dict()
    if set(ours) != set(theirs):
        raise RoundTripError(f"{folder} loads other parameters: {sorted(set(ours) ^ set(theirs))[:5]}.")
    changed = [k for k in ours if not torch.equal(ours[k].cpu(), theirs[k].cpu())]
    if changed:
        raise RoundTripError(f"{folder} loads other weights for {changed[:5]}.")
    texts = ['a photo of a dog.', 'Rank the images by how many objects they show.']
    tokens = tokenizer(texts)
    reloaded_tokens = open_clip.get_tokenizer(name)(texts)
    if not torch.equal(torch.as_tensor(tokens), torch.as_tensor(reloaded_tokens)):
        raise RoundTripError(f"{folder} loads another tokenizer ({type(open_clip.get_tokenizer(name)).__name__}); "
                             f"set text_cfg.hf_tokenizer_name in the model config.")
    for label, a, b in zip(('image features', 'text features', 'scores'), _outputs(model, tokens),
                           _outputs(loaded, tokens), strict=False):  # plain models: no scores
        try:
            torch.testing.assert_close(a, b, equal_nan=True)
        except AssertionError as err:
            raise RoundTripError(f"{folder} gives other {label} than the model: {str(err).splitlines()[0]}") from None


def _outputs(model, tokens):
    """Image and text features (and, for rank models, scores through the rank-model protocol) on a fixed input."""
    import torch

    from ..models.base import RankModel
    size = model.visual.preprocess_cfg.get('size', 224)
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    dtypes = {p.dtype for p in model.visual.parameters()}  # a low precision where the weights were cast
    dtype = next((d for d in (torch.bfloat16, torch.float16) if d in dtypes), torch.float32)
    images = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(0)).to(dtype)
    with torch.no_grad():
        out = [model.encode_image(images).float(), model.encode_text(tokens).float()]
        if isinstance(model, RankModel):
            prompts = model.encode_prompts(tokens[:1] if model.needs_prompt else None)
            out.append(model.score_tokens(model.encode_image_tokens(images), prompts).float())
    return out


# --- the model -------------------------------------------------------------------------------------------

@dataclass
class Pushable:
    """A model ready to share: built with its weights, its config and tokenizer."""
    model: object
    model_config: dict
    tokenizer: object
    name: str  # the config's name, for the card
    precision: str = 'fp32'


def _register(config: dict, name: str) -> str:
    """``config`` as a named OpenCLIP config (a temporary folder, removed once read)."""
    import open_clip
    registered = f"push-{re.sub(r'[^A-Za-z0-9_.-]+', '-', name)}"
    with tempfile.TemporaryDirectory(prefix='open_clip_rank_push_') as folder:
        (Path(folder) / f'{registered}.json').write_text(json.dumps(config))
        open_clip.add_model_config(folder)
    return registered


def build_pushable(model: Optional[str] = None, config_path=None, pretrained: Optional[str] = None,
                   precision: str = 'fp32', image_mean=None, image_std=None, image_interpolation=None,
                   image_resize_mode=None, run_params: Optional[dict] = None) -> Pushable:
    """The model to push, as ``open_clip.create_model_and_transforms`` builds it, with its config.

    ``pretrained``: a checkpoint file (a training run's ``epoch_N.pt``, an official checkpoint; loaded whichever way
    the model is named) or an OpenCLIP pretrained tag of a built-in name; without it the weights of a
    ``local-dir:`` / ``hf-hub:`` source. ``run_params``: the training run's ``params.txt``, whose model-changing
    overrides the config gets. A rank model without trained weights is refused (``UninitialisedModelError``).
    """
    import open_clip

    from ..files.checkpoints import base_weights_from, check_readable, loaded_from
    from ..inference import UninitialisedModelError
    from ..integration.compat import read_model_config, split_model_name
    from ..integration.start_checks import check_model_name
    if (model is None) == (config_path is None):
        raise ValueError("give exactly one of a model name (--model) or a model config file (--config-path).")
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}.")
    schema = None
    if model is not None:
        check_model_name(model)
        schema, _ = split_model_name(model)
        config = read_model_config(model)
        if config is None:
            raise ValueError(f"model {model}: its config cannot be read.")
        name = model if schema is None else Path(model.split(':', 1)[1]).name
    else:
        config = read_model_config_file(config_path)
        name = (run_params or {}).get('model') or Path(config_path).stem
    preprocess = dict(image_mean=image_mean, image_std=image_std, image_interpolation=image_interpolation,
                      image_resize_mode=image_resize_mode)
    is_file = pretrained is not None and os.path.isfile(pretrained)
    if is_file:  # built from the config itself (with the run's overrides), so the config written is the one built
        check_readable(pretrained, fix='Pass a complete checkpoint (--pretrained).')
        config = config_as_built(config, run_params or {})
        build_name, build_pretrained, quick_gelu = _register(config, name), pretrained, False
    elif pretrained is not None:  # an OpenCLIP tag
        if schema is not None or model is None:
            raise ValueError(f"--pretrained {pretrained} is neither a file nor usable as a pretrained tag here: tags "
                             f"belong to built-in model names, and {model or config_path} is not one.")
        tag = open_clip.get_pretrained_cfg(model, pretrained)
        if not tag:
            tags = open_clip.list_pretrained_tags_by_model(model)
            raise FileNotFoundError(f"--pretrained {pretrained} is neither a file nor a pretrained tag of {model} "
                                    f"(tags: {', '.join(tags) or 'none'}).")
        quick_gelu = bool(tag.get('quick_gelu')) and not config.get('quick_gelu')
        if quick_gelu:  # as OpenCLIP's push: the config says what the tag's weights were trained with
            config = {**config, 'quick_gelu': True}
        build_name, build_pretrained = model, pretrained
    else:
        if schema is None:
            raise ValueError(f"no weights to push: pass --pretrained CHECKPOINT (or an OpenCLIP pretrained tag); "
                             f"{model or config_path} alone would push random weights.")
        source = Path(model.split(':', 1)[1])
        if schema == 'local-dir' and not any(p.suffix in WEIGHT_SUFFIXES for p in source.iterdir()):
            raise ValueError(f"no weights to push: {source} holds no weights file; pass --pretrained CHECKPOINT.")
        build_name, build_pretrained, quick_gelu = model, None, False
    try:
        net, _, _ = open_clip.create_model_and_transforms(
            build_name, pretrained=build_pretrained, precision=precision, device='cpu', force_quick_gelu=quick_gelu,
            **preprocess)
    except AttributeError as err:
        if precision == 'fp32':
            raise
        raise ValueError(f"OpenCLIP cannot cast model {name} to {precision} ({type(err).__name__}: {err}): push "
                         f"fp32 weights.") from None
    family = registry.family_for_model(net)
    if family is not None and loaded_from(net) is None:
        base = base_weights_from(net)
        raise UninitialisedModelError(
            f"{base} holds base CLIP weights only: the {family.name} model's own parameters are untrained; push a "
            f"checkpoint trained with this plugin (--pretrained)." if base else
            f"model {model or config_path} holds no trained weights (none in its source): pass --pretrained "
            f"CHECKPOINT.")
    return Pushable(net.eval(), config, open_clip.get_tokenizer(build_name), name, precision)


def write_local_dir(model, tokenizer, model_config: dict, local_dir, readme: Optional[str] = None,
                    safe_serialization='both', check_precision: Optional[str] = 'fp32') -> List[str]:
    """The folder a push would upload, written to ``local_dir`` (created) instead: written beside it, checked by
    loading it back, then moved in file by file. A folder holding other weight files (which OpenCLIP's loaders
    could pick instead) is refused. Returns the names written."""
    target = Path(local_dir)
    if target.exists() and not target.is_dir():
        raise ValueError(f"--local-dir {target} is a file, not a folder.")
    target.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix='.push-', dir=target))
    try:
        save_for_hf(model, tokenizer, model_config, staging, safe_serialization=safe_serialization, readme=readme)
        written = sorted(p.name for p in staging.iterdir())
        others = [p.name for p in target.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.name not in written]
        if others:
            raise ValueError(f"--local-dir {target} holds other weights ({', '.join(sorted(others))}), which "
                             f"OpenCLIP's local-dir: loader could pick instead: choose an empty folder.")
        if check_precision is not None:
            check_round_trip(staging, model, tokenizer, check_precision)
        for name in written:
            os.replace(staging / name, target / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return written
