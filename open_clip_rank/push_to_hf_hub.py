"""Share a trained model on the Hugging Face Hub: ``python -m open_clip_rank.push_to_hf_hub``.

OpenCLIP 3.3's own ``python -m open_clip.push_to_hf_hub`` cannot run with the huggingface_hub its install brings
(2.x removed ``repo_type_and_id_from_hf_id``, which it imports, so every push dies with a NameError), and it fetches
an HF copy of the CLIP tokenizer over the network even for models whose tokenizer ships with OpenCLIP. This command
takes OpenCLIP's flags (``--model --pretrained --repo-id --precision --image-mean --image-std
--image-interpolation --image-resize-mode --hf-tokenizer-self``), writes the folder with OpenCLIP's own
``save_for_hf`` (``open_clip_config.json``, ``open_clip_model.safetensors``, ``open_clip_pytorch_model.bin``) and
pushes it with huggingface_hub's current API. ``--local-dir DIR`` writes the folder without pushing (for
``hf upload``, or to look first).

What the plugin adds to OpenCLIP's push:

* the model config is the one the weights were trained with: a rank family's config key is kept (``hf-hub:`` and
  ``local-dir:`` build the family from the config, whatever the repo is called), a ``--config-path`` file is
  used as is, and the ``--force-*`` / ``--siglip`` overrides of the training run (its ``params.txt``) are applied;
* families that resize without cropping (``RankFamily.square_resize``) get that preprocessing in the config
  (``resize_mode: squash``, bicubic), so OpenCLIP's own transforms match training's;
* the built-in tokenizer writes no files and needs no network (``get_tokenizer('hf-hub:...')`` builds it from the
  config); Hugging Face tokenizers are saved with the model, as OpenCLIP does;
* a rank model without trained weights is refused, and the written folder is loaded back (``local-dir:``) and
  compared with the model (family, weights, outputs, tokens) before anything is pushed;
* a model card (``README.md``) saying what a ranker needs: the instructions and categories of its training data,
  what its score means (the family's ``model_card`` hook), the base model and pretrained tag, the dataset, the
  validation metrics of the pushed epoch (the sample type's ``card_metrics``, from the run's ``results.jsonl``
  or ``--metrics``) and a scoring command to copy.

Everything family-specific comes from the registry; this module never names a family.
"""
import argparse
import ast
import copy
import json
import logging
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

from . import registry

_logger = logging.getLogger(__name__)

PROG = 'python -m open_clip_rank.push_to_hf_hub'
PLACEHOLDER_REPO = 'ORG/NAME'
PRECISIONS = ('fp32', 'fp16', 'bf16', 'pure_fp16', 'pure_bf16')  # the dtype of the weights written
WEIGHT_SUFFIXES = ('.safetensors', '.bin', '.pth')  # what OpenCLIP's local-dir:/hf-hub: loaders pick up
RUN_FILES = ('params.txt', 'results.jsonl')
# the training run's CSV flags (params.txt), OpenCLIP's and the plugin's defaults otherwise
DATA_OPTION_DEFAULTS = {'csv_img_key': 'filepath', 'csv_caption_key': 'title', 'csv_value_key': 'value',
                        'csv_category_key': 'cname', 'csv_separator': '\t'}
CARD_LIST_LIMIT = 20  # instructions / categories listed on a card
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
    from .models.base import unwrap
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

    from .files.atomic import atomic_write
    from .integration.compat import openclip_hub_writers
    from .models.base import unwrap
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

    from .models.base import unwrap
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

    from .models.base import RankModel
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


def _read_config_file(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model config {path} does not exist.")
    try:
        config = json.loads(path.read_text(encoding='utf-8'))
    except json.JSONDecodeError as err:
        raise ValueError(f"model config {path} is not valid JSON ({err}).") from None
    config = config.get('model_cfg', config)  # open_clip_config.json wraps the model config
    config.pop('model_version', None)  # the official inference script passes it beside the config
    return config


def run_overrides(config: dict, params: dict) -> dict:
    """``config`` as the training run built it: OpenCLIP's ``--force-*`` and ``--siglip`` overrides of its
    ``params.txt`` (``params``) applied (``create_model`` applies them to the named config at build time)."""
    config = copy.deepcopy(config)
    if params.get('force_quick_gelu'):
        config['quick_gelu'] = True
    if params.get('force_custom_text'):
        config['custom_text'] = True
    size = params.get('force_image_size')
    if size:
        config.setdefault('vision_cfg', {})['image_size'] = size[0] if isinstance(size, (list, tuple)) \
            and len(size) == 1 else size
    if params.get('force_context_length'):
        config.setdefault('text_cfg', {})['context_length'] = params['force_context_length']
    if params.get('siglip'):  # open_clip_train.main's model_kwargs for --siglip
        config['init_logit_scale'] = math.log(10)
        config['init_logit_bias'] = -10
    return config


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

    from .files.checkpoints import base_weights_from, check_readable, loaded_from
    from .inference import UninitialisedModelError
    from .integration.compat import read_model_config, split_model_name
    from .integration.start_checks import check_model_name
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
        config = _read_config_file(config_path)
        name = (run_params or {}).get('model') or Path(config_path).stem
    preprocess = dict(image_mean=image_mean, image_std=image_std, image_interpolation=image_interpolation,
                      image_resize_mode=image_resize_mode)
    is_file = pretrained is not None and os.path.isfile(pretrained)
    if is_file:  # built from the config itself (with the run's overrides), so the config written is the one built
        check_readable(pretrained, fix='Pass a complete checkpoint (--pretrained).')
        config = run_overrides(config, run_params or {})
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


# --- the training run -------------------------------------------------------------------------------------

def run_folder_of(checkpoint) -> Optional[Path]:
    """``logs/<name>`` of a training run's checkpoint ``logs/<name>/checkpoints/<file>`` (None for other files)."""
    path = Path(checkpoint).resolve()
    run = path.parent.parent
    if path.parent.name == 'checkpoints' and any((run / f).is_file() for f in RUN_FILES):
        return run
    return None


def _param_value(text: str):
    if text == 'None':
        return None
    if text in ('True', 'False') or text[:1] in '[(-0123456789':
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    return text


def read_params(path) -> dict:
    """OpenCLIP's ``params.txt`` (``name: value`` per line, as ``main`` writes its arguments) as a dict; values are
    Python literals where they read as one (None, booleans, numbers, lists), else the text (a tab stays a tab)."""
    params = {}
    for line in Path(path).read_text(encoding='utf-8').split('\n'):
        name, sep, value = line.partition(': ')
        if sep and name.isidentifier():
            params[name] = _param_value(value)
    return params


def checkpoint_epoch(path) -> Optional[int]:
    """The epoch a checkpoint ends (``epoch_N.pt``, else its ``epoch`` entry), or None."""
    match = re.fullmatch(r'epoch_(\d+)\.pt', Path(path).name)
    if match:
        return int(match.group(1))
    try:
        import torch
        data = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except Exception:  # not a zip checkpoint, or not a training checkpoint: no epoch to tell
        return None
    epoch = data.get('epoch') if isinstance(data, dict) else None
    return epoch if isinstance(epoch, int) else None


def read_metrics(path, epoch: Optional[int] = None) -> Optional[dict]:
    """The metrics of ``epoch`` in ``path``: a run's ``results.jsonl`` (one record per validation; the last record of
    ``epoch``, or the last one when the epoch is unknown), a JSON object of metrics, or the rank CLI's output JSON
    (its ``metrics``). None when no record has that epoch."""
    text = Path(path).read_text(encoding='utf-8')
    try:
        whole = json.loads(text)
    except json.JSONDecodeError:
        whole = None
    if isinstance(whole, dict):
        records = [whole['metrics'] if isinstance(whole.get('metrics'), dict) else whole]
    else:
        records = []
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} line {number} is not JSON ({err}): give a results.jsonl or a JSON "
                                     f"object of metrics.") from None
        records = [r for r in records if isinstance(r, dict)]
        if not records:
            raise ValueError(f"{path} holds no metrics record.")
    if epoch is not None and any('epoch' in r for r in records):
        records = [r for r in records if r.get('epoch') == epoch]
    return records[-1] if records else None


# --- the model card ---------------------------------------------------------------------------------------

@dataclass
class CardFacts:
    """What a model card says beyond the model itself (each optional)."""
    repo_id: str = PLACEHOLDER_REPO
    base_model: Optional[str] = None
    base_pretrained: Optional[str] = None
    dataset_name: Optional[str] = None
    train_file: Optional[str] = None  # the training file's name (never its full local path)
    data: dict = field(default_factory=dict)  # the sample type's describe_data of the training file
    instructions: List[str] = field(default_factory=list)  # given: replace the training file's
    categories: List[str] = field(default_factory=list)
    metrics: Optional[dict] = None
    metrics_source: Optional[str] = None
    epoch: Optional[int] = None
    loss: Optional[str] = None  # a registered loss name (its summary goes on the card)
    license: str = 'mit'
    description: Optional[str] = None


def _listed(items):
    items = [str(i) for i in items]
    return items if len(items) <= CARD_LIST_LIMIT else items[:CARD_LIST_LIMIT] + [
        f'... ({len(items) - CARD_LIST_LIMIT} more)']


def _number(value) -> str:
    return 'n/a' if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) \
        else f'{value:.4f}'


def metrics_table(metrics: dict, columns=()) -> str:
    """A markdown table of a validation record: rows 'mean' (the headline entries) and each 'CATEGORY/<metric>'
    prefix, columns the sample type's ``card_metrics``; without columns, one row per numeric entry."""
    if not columns:
        rows = [(k, v) for k, v in metrics.items() if k != 'epoch' and isinstance(v, (int, float))
                and not isinstance(v, bool)]
        return '\n'.join(['| metric | value |', '| --- | --- |', *(f'| {k} | {_number(v)} |' for k, v in rows)])
    groups = {'mean': {m: metrics[m] for m in columns if m in metrics}}
    for key, value in metrics.items():
        group, _, metric = key.rpartition('/')
        if group and metric in columns:
            groups.setdefault(group, {})[metric] = value
    shown = [m for m in columns if any(m in g for g in groups.values())]
    lines = ['| | ' + ' | '.join(shown) + ' |', '| --- |' + ' --- |' * len(shown)]
    for group, values in groups.items():
        if values:
            lines.append(f'| {group} | ' + ' | '.join(_number(values.get(m)) for m in shown) + ' |')
    return '\n'.join(lines)


def _usage(model, repo_id: str, instruction: Optional[str]) -> str:
    from .models.base import RankModel
    name = f'hf-hub:{repo_id}'
    needs = ("Needs OpenCLIP (`open_clip_torch>=3.3,<3.4`) and the open_clip_rank plugin installed: the plugin "
             "registers the model family that `hf-hub:` builds from `open_clip_config.json`.\n")
    if not isinstance(model, RankModel):
        return (needs + "\n```python\nimport open_clip\n"
                f"model, _, preprocess = open_clip.create_model_and_transforms({name!r})\n"
                f"tokenizer = open_clip.get_tokenizer({name!r})\n```\n")
    if model.needs_prompt:
        prompt = instruction or 'Rank the ...'
        command = (f"python -m open_clip_rank.rank --model {name} --images FOLDER --prompt {shlex.quote(prompt)} "
                   f"--output-path ranked")
        python = ("from open_clip_rank.inference import load_rank_model, rank_images\n"
                  f"model, transform, tokenizer = load_rank_model({name!r})\n"
                  "paths = ['a.jpg', 'b.jpg']  # your images\n"
                  f"for r in rank_images(model, paths, {prompt!r}, transform, tokenizer):\n"
                  "    print(r['rank'], r['score'], r['image'])")
    else:
        command = f"python -m open_clip_rank.rank --model {name} --images FOLDER --output-path ranked"
        python = ("from open_clip_rank.inference import load_rank_model, predict_images\n"
                  f"model, transform, _ = load_rank_model({name!r})\n"
                  "paths = ['a.jpg', 'b.jpg']  # your images\n"
                  "predictions, skipped = predict_images(model, paths, transform)  # {'score': [N], ...}")
    return (needs + "\nRank a folder of images (writes ranked.csv and ranked.json, best first):\n\n"
            f"```bash\n{command}\n```\n\nFrom Python:\n\n```python\n{python}\n```\n")


def model_card(model, model_config: dict, facts: CardFacts) -> str:
    """``README.md`` for a pushed model: OpenCLIP's ``generate_readme`` with what a ranker needs (the family's part
    from its ``model_card`` hook, the metrics columns from its sample type's ``card_metrics``), then the validation
    metrics of the pushed epoch."""
    from .integration.compat import openclip_hub_writers
    from .models.base import unwrap
    _, generate_readme = openclip_hub_writers()
    model = unwrap(model)
    family = registry.family_for_model(model)
    part = registry.import_function(family.model_card)(model_config, facts.data) \
        if family is not None and family.model_card else {}
    instructions = facts.instructions or facts.data.get('instructions') or []
    categories = facts.categories or facts.data.get('categories') or []
    details = {'Model type': f"{family.name} rank model (open_clip_rank, OpenCLIP {_openclip_version()})"
               if family else f"CLIP ({type(model).__name__}, OpenCLIP {_openclip_version()})"}
    if facts.base_model:
        details['Base model'] = facts.base_model + (f" (pretrained: {facts.base_pretrained})"
                                                    if facts.base_pretrained else '')
    if facts.dataset_name:
        details['Dataset'] = facts.dataset_name
    if facts.train_file:
        rows = facts.data.get('rows')
        details['Training data'] = facts.train_file + (f' ({rows} rows)' if rows else '')
    if instructions:
        details['Instructions (training)'] = _listed(instructions)
    if categories:
        details['Categories'] = _listed(categories)
    if part.get('score') or family is None:
        details['Score'] = part.get('score') or (
            "as any CLIP: the cosine similarity of the normalised image and text embeddings, in [-1, 1]; higher = a "
            "better match (rank images by their similarity to a caption).")
    loss = registry.LOSSES.get(facts.loss) if facts.loss else None
    if loss is not None:
        details['Loss'] = loss.summary or loss.name
    if facts.epoch is not None:
        details['Epoch'] = facts.epoch
    details.update(part.get('details', {}))
    card = {'tags': ['clip', 'open_clip', 'open_clip_rank', *([family.name, 'image-ranking'] if family else [])],
            'license': facts.license, 'details': details,
            'description': facts.description or part.get('description') or (
                'An OpenCLIP model shared with open_clip_rank.' + (f' Trained with {loss.summary}.' if loss else '')),
            'usage': _usage(model, facts.repo_id, instructions[0] if instructions else None)}
    if part.get('pipeline_tag'):
        card['pipeline_tag'] = part['pipeline_tag']
    text = generate_readme(card, facts.repo_id.split('/')[-1])
    if facts.metrics:
        sample_type = registry.sample_type_of_model(model) if family is not None else None
        epoch = facts.metrics.get('epoch', facts.epoch)
        where = ', '.join(x for x in (f'epoch {epoch}' if epoch is not None else '',
                                      f'from {facts.metrics_source}' if facts.metrics_source else '',
                                      f"precision {facts.metrics['precision']}" if facts.metrics.get('precision')
                                      else '') if x)
        text += (f"\n## Validation metrics\n\nThe pushed weights' metrics ({where}).\n\n"
                 f"{metrics_table(facts.metrics, sample_type.card_metrics if sample_type else ())}\n")
    return text


def _openclip_version() -> str:
    import open_clip
    return open_clip.__version__


# --- pushing ------------------------------------------------------------------------------------------------

def push_to_hf_hub(model, tokenizer, model_config: dict, repo_id: str, commit_message: str = 'Add model',
                   token: Optional[str] = None, revision: Optional[str] = None, private: bool = False,
                   create_pr: bool = False, readme: Optional[str] = None, replace_readme: bool = False,
                   safe_serialization='both', check_precision: Optional[str] = 'fp32'):
    """OpenCLIP's ``push_to_hf_hub`` on huggingface_hub's current API (``HfApi.create_repo`` / ``upload_folder``):
    the folder ``save_for_hf`` writes, checked by loading it back (``check_precision``: the precision to load it
    at; None skips the check). An existing ``README.md`` in the repo is kept, as OpenCLIP does, unless
    ``replace_readme``. Returns huggingface_hub's commit info."""
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if readme is not None and not replace_readme and api.file_exists(repo_id, README, revision=revision):
        _logger.warning(f"{repo_id} already has a {README}: kept (it may describe other weights); --replace-card "
                        f"writes this push's card.")
        readme = None
    with tempfile.TemporaryDirectory(prefix='open_clip_rank_push_') as folder:
        save_for_hf(model, tokenizer, model_config, folder, safe_serialization=safe_serialization, readme=readme)
        if check_precision is not None:
            check_round_trip(folder, model, tokenizer, check_precision)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision, create_pr=create_pr,
                                 commit_message=commit_message)


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


# --- the command --------------------------------------------------------------------------------------------

def build_parser():
    registry.load_plugins()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mdl = p.add_argument_group('model (OpenCLIP\'s push flags; --model or --config-path, default: the run\'s --model)')
    mdl.add_argument('--model', type=str, default=None, help='OpenCLIP model name (built-in, local-dir:, hf-hub:).')
    mdl.add_argument('--config-path', type=str, default=None,
                     help='Model config JSON (e.g. a run\'s logs/<name>/config.json, the official model-config.json).')
    mdl.add_argument('--pretrained', '--checkpoint-path', dest='pretrained', type=str, default=None,
                     help='Checkpoint file (a run\'s logs/<name>/checkpoints/epoch_N.pt: its params.txt and '
                          'results.jsonl feed the config and the card) or an OpenCLIP pretrained tag. Default: the '
                          'weights of a local-dir: / hf-hub: model.')
    mdl.add_argument('--precision', type=str, default='fp32', choices=PRECISIONS, help='Dtype of the weights written.')
    mdl.add_argument('--image-mean', type=float, nargs='+', default=None, metavar='MEAN',
                     help='Override the image mean (default: the run\'s --image-mean, else the model\'s).')
    mdl.add_argument('--image-std', type=float, nargs='+', default=None, metavar='STD',
                     help='Override the image std (default: the run\'s --image-std, else the model\'s).')
    mdl.add_argument('--image-interpolation', type=str, default=None, choices=['bicubic', 'bilinear', 'random'],
                     help='Image resize interpolation written to the config (not for families that resize '
                          'without cropping: theirs is fixed).')
    mdl.add_argument('--image-resize-mode', type=str, default=None, choices=['shortest', 'longest', 'squash'],
                     help='Image resize mode written to the config (not for families that resize without cropping).')
    mdl.add_argument('--hf-tokenizer-self', action='store_true',
                     help='Point the config\'s hf_tokenizer_name at the pushed repo (Hugging Face tokenizers only; '
                          'OpenCLIP\'s built-in tokenizer needs no files).')
    dst = p.add_argument_group('destination (--repo-id and/or --local-dir)')
    dst.add_argument('--repo-id', type=str, default=None, help='Hub repo, ORG/NAME.')
    dst.add_argument('--local-dir', type=str, default=None,
                     help='Write the folder here instead of pushing (then e.g. hf upload ORG/NAME DIR).')
    dst.add_argument('--private', action='store_true', help='Create the repo private.')
    dst.add_argument('--revision', type=str, default=None, help='Branch to push to.')
    dst.add_argument('--create-pr', action='store_true', help='Push as a pull request.')
    dst.add_argument('--commit-message', type=str, default='Add model')
    dst.add_argument('--replace-card', action='store_true',
                     help='Replace the repo\'s README.md (default: an existing one is kept, as OpenCLIP does).')
    dst.add_argument('--no-check', action='store_true',
                     help='Skip loading the written folder back and comparing it with the model.')
    card = p.add_argument_group('model card (README.md)')
    card.add_argument('--instructions', action='append', default=None, metavar='TEXT',
                      help='An instruction the model was trained on (repeat). Default: the training data\'s.')
    card.add_argument('--categories', action='append', default=None, metavar='WORD',
                      help='A category the model was trained on (repeat). Default: the training data\'s.')
    card.add_argument('--train-data', type=str, default=None,
                      help='Training file to read instructions, categories and target range from, in the format of '
                           'the model\'s data. Default: the run\'s --train-data, where it exists here.')
    card.add_argument('--dataset-name', type=str, default=None, help='Name of the training dataset (card metadata).')
    card.add_argument('--metrics', type=str, default=None,
                      help='results.jsonl (the pushed epoch\'s record), a JSON object of metrics or the rank CLI\'s '
                           'output JSON. Default: the run\'s results.jsonl.')
    card.add_argument('--base-pretrained', type=str, default=None,
                      help='OpenCLIP pretrained tag training started from. Default: the run\'s --pretrained.')
    card.add_argument('--license', type=str, default='mit', help='License in the card metadata (OpenCLIP\'s default).')
    card.add_argument('--description', type=str, default=None, help='Replaces the card\'s opening paragraph.')
    return p


IMAGE_FLAGS = ('image_mean', 'image_std', 'image_interpolation', 'image_resize_mode')


def _preflight(args, model_name) -> None:
    """The flags alone, before the model is built: one line each (ValueError)."""
    from .integration.compat import read_model_config
    if args.pretrained and os.path.isdir(args.pretrained):
        raise ValueError(f"--pretrained {args.pretrained} is a folder: give a checkpoint file (a run's "
                         f"checkpoints/epoch_N.pt) or a pretrained tag.")
    if not args.repo_id and not args.local_dir:
        raise ValueError("give --repo-id ORG/NAME to push, or --local-dir DIR to write the folder only.")
    if args.repo_id and args.repo_id.count('/') != 1:
        raise ValueError(f"--repo-id {args.repo_id}: a Hub repo id is ORG/NAME.")
    if args.hf_tokenizer_self and not args.repo_id:
        raise ValueError("--hf-tokenizer-self points the config at the pushed repo: give --repo-id ORG/NAME.")
    config = _read_config_file(args.config_path) if args.config_path else (
        read_model_config(model_name) if model_name else None)
    family = registry.family_for_config(config)
    if family is not None and family.square_resize and (args.image_interpolation or args.image_resize_mode):
        raise ValueError(f"{family.name} models are resized to the square input without cropping (bicubic), as in "
                         f"training: --image-interpolation / --image-resize-mode do not apply.")


def _card_facts(args, pushable, run, params, epoch) -> CardFacts:
    family = registry.family_for_config(pushable.model_config)
    facts = CardFacts(repo_id=args.repo_id or PLACEHOLDER_REPO, dataset_name=args.dataset_name, epoch=epoch,
                      instructions=args.instructions or [], categories=args.categories or [], license=args.license,
                      description=args.description)
    trained = params.get('model') or pushable.name
    facts.base_model = registry.base_model_name(trained) or (trained if family is None else None)
    facts.base_pretrained = args.base_pretrained or (params.get('pretrained')
                                                     if _is_tag(params.get('pretrained')) else None)
    if params:
        facts.loss = params.get('loss_opt') or (family.default_loss if family is not None else None)
    train_data = args.train_data or params.get('train_data')
    if train_data:
        facts.train_file = Path(str(train_data).split('::')[0]).name
        facts.data = _describe(train_data, family, params, pushable.model_config, explicit=bool(args.train_data))
    metrics_path = args.metrics or (run / 'results.jsonl' if run is not None and (run / 'results.jsonl').is_file()
                                    else None)
    if metrics_path is not None:
        facts.metrics = read_metrics(metrics_path, epoch)
        facts.metrics_source = Path(metrics_path).name
        if facts.metrics is None:
            message = f"{metrics_path} has no record of epoch {epoch}"
            if args.metrics:
                raise ValueError(message + ": give the metrics of the pushed weights (or leave --metrics out).")
            _logger.warning(message + ": the card lists no validation metrics.")
    return facts


def _is_tag(value) -> bool:
    """An OpenCLIP pretrained tag, not a file (a local path never goes on a card)."""
    return isinstance(value, str) and bool(value) and not os.path.exists(value) and '/' not in value \
        and os.sep not in value and not value.endswith(('.pt', '.pth', '.bin', '.safetensors', '.npz'))


def _describe(path, family, params, model_config, explicit: bool) -> dict:
    """The family's sample type's description of the training file (empty where there is none to read)."""
    if family is None:
        return {}
    name = params.get('csv_dataset_sample_type')
    sample_type = registry.SAMPLE_TYPES.get(name) if name in family.sample_types else None
    sample_type = sample_type or registry.SAMPLE_TYPES[family.sample_types[0]]
    if not sample_type.describe_data or not os.path.isfile(str(path)):
        if explicit:
            raise FileNotFoundError(f"--train-data {path} is not a file this command can read.")
        return {}
    options = {k: params.get(k) if params.get(k) is not None else v for k, v in DATA_OPTION_DEFAULTS.items()}
    options = SimpleNamespace(**options, num_ranks=family.ranks_of(model_config))
    return registry.import_function(sample_type.describe_data)(str(path), options)


def push_command(args) -> int:
    is_file = bool(args.pretrained) and os.path.isfile(args.pretrained)
    run = run_folder_of(args.pretrained) if is_file else None
    params = read_params(run / 'params.txt') if run is not None and (run / 'params.txt').is_file() else {}
    model_name = args.model
    if model_name is None and args.config_path is None and params.get('model'):
        model_name = params['model']
        _logger.info(f"--model {model_name}: the training run's (params.txt)")
    _preflight(args, model_name)
    # the run's image flags where none is given (a family that resizes without cropping ignores them, as training)
    preprocess = {flag: getattr(args, flag) if getattr(args, flag) is not None else params.get(flag)
                  for flag in IMAGE_FLAGS}
    pushable = build_pushable(model_name, args.config_path, args.pretrained, args.precision, run_params=params,
                              **preprocess)
    if args.hf_tokenizer_self and not hasattr(pushable.tokenizer, 'save_pretrained'):
        raise ValueError("--hf-tokenizer-self points the config at tokenizer files in the repo; this model uses "
                         "OpenCLIP's built-in tokenizer, which needs none: leave it out.")
    config = pushable.model_config
    if args.hf_tokenizer_self:
        config = copy.deepcopy(config)
        config.setdefault('text_cfg', {})['hf_tokenizer_name'] = args.repo_id
    epoch = checkpoint_epoch(args.pretrained) if is_file else None
    readme = model_card(pushable.model, config, _card_facts(args, pushable, run, params, epoch))
    check = None if args.no_check else args.precision
    if args.local_dir:
        written = write_local_dir(pushable.model, pushable.tokenizer, config, args.local_dir, readme=readme,
                                  check_precision=check)
        print(f"wrote {args.local_dir}: {', '.join(written)}")
        if args.repo_id:
            print(f"push it with: hf upload {args.repo_id} {args.local_dir}")
        return 0
    try:
        info = push_to_hf_hub(pushable.model, pushable.tokenizer, config, args.repo_id,
                              commit_message=args.commit_message, revision=args.revision, private=args.private,
                              create_pr=args.create_pr, readme=readme, replace_readme=args.replace_card,
                              check_precision=check)
    except OSError as err:  # huggingface_hub's HTTP and offline errors: the Hub refused or cannot be reached
        first = str(err).strip().splitlines()[0] if str(err).strip() else ''
        print(f"open_clip_rank.push_to_hf_hub: error: the push to {args.repo_id} failed ({type(err).__name__}: "
              f"{first}); log in with hf auth login (or set HF_TOKEN), or write the folder with --local-dir and "
              f"upload it later (hf upload).", file=sys.stderr)
        return 1
    print(f"pushed {pushable.name} to {args.repo_id}: {getattr(info, 'commit_url', info)}")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    from .integration.compat import quiet_torch_loggers
    quiet_torch_loggers()
    try:
        return push_command(args)
    except (ValueError, FileNotFoundError) as err:
        print(f"open_clip_rank.push_to_hf_hub: error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2


if __name__ == '__main__':
    sys.exit(main())
