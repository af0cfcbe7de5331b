"""The model card (``README.md``) of a pushed model, saying what a ranker needs: the instructions and categories of
its training data, what its score means (the family's ``model_card`` hook), the base model and pretrained tag, the
dataset, the validation metrics of the pushed epoch (the sample type's ``card_metrics``, from the run's
``results.jsonl`` or ``--metrics``) and a scoring command to copy.

Everything family-specific comes from the registry; this module never names a family.
"""
import logging
import math
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import List, Optional

from .. import registry
from .run_folder import read_metrics

_logger = logging.getLogger(__name__)

PLACEHOLDER_REPO = 'ORG/NAME'
# the training run's CSV flags (params.txt), OpenCLIP's and the plugin's defaults otherwise
DATA_OPTION_DEFAULTS = {'csv_img_key': 'filepath', 'csv_caption_key': 'title', 'csv_value_key': 'value',
                        'csv_category_key': 'cname', 'csv_separator': '\t'}
CARD_LIST_LIMIT = 20  # instructions / categories listed on a card


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
    from ..models.base import RankModel
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
    from ..integration.compat import openclip_hub_writers
    from ..models.base import unwrap
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
