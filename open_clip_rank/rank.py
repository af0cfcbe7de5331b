"""Rank images by an instruction with a trained model: ``python -m open_clip_rank.rank``.

Two inputs:
* a CSV in the format of the model's data (its family's sample type reads it, e.g. filepath, title, cname[,
  value] for adapter models): every image is scored under its own row's instruction; with ground truth,
  the sample type's metrics are written too;
* ``--images FOLDER --prompt "Rank the numbers of cat." [--prompt ...]``: every image under each prompt.

Models whose prompts are learned (``needs_prompt`` False, e.g. ``*-ordinal``) take no prompt; every prediction
their family makes per image (``rank_predictions``: e.g. expected and argmax rank) becomes a column.

Writes ``<output>.csv`` (image, prompt, score, rank[, other predictions, category, target], skipped),
``<output>.json`` (the precision, the skipped images, the metrics when ground truth is present), optionally a
contact sheet PNG; each file is written atomically, and every output location is checked writable before the
model loads. Unreadable images and images with a non-finite score are listed as skipped, never ranked; when
nothing could be ranked the command exits with status 1 and one line.
Everything family-specific comes from the registry (the sample type's ``read_rows``, ``report`` and CLI
flags) and the rank-model protocol, never from a family's modules.
"""
import argparse
import csv
import json
import logging
import sys
from pathlib import Path

from . import registry

_logger = logging.getLogger(__name__)

PRECISIONS = ('fp32', 'bf16', 'fp16', 'amp', 'amp_bf16', 'amp_bfloat16')  # OpenCLIP's --precision names


def build_parser():
    registry.load_plugins()  # their sample types may add flags
    p = argparse.ArgumentParser(prog='python -m open_clip_rank.rank', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group('input (one of)')
    src.add_argument('--data-to-inference', '--csv', dest='csv', type=str, default=None,
                     help='CSV in the training format of the model\'s data (adapter: filepath, title, cname[, value]).')
    src.add_argument('--images', type=str, default=None, help='Folder of images (searched recursively).')
    src.add_argument('--prompt', action='append', default=None,
                     help='Instruction for --images; repeat for several (each image is scored under each).')
    src.add_argument('--image-root', type=str, default=None,
                     help='Folder that relative image paths of --csv (a CSV or list file) resolve against. '
                          'Default: the current directory.')
    src.add_argument('--csv-relative-paths', action='store_true',
                     help='Relative image paths of --csv resolve against the folder of that file (not with '
                          '--image-root).')
    mdl = p.add_argument_group('model (one of --model / --config-path)')
    mdl.add_argument('--model', type=str, default=None, help='OpenCLIP model name (built-in, local-dir:, hf-hub:).')
    mdl.add_argument('--config-path', type=str, default=None,
                     help='Model config JSON, e.g. the official model-config.json.')
    mdl.add_argument('--checkpoint-path', type=str, default=None, help='Checkpoint (official or OpenCLIP training).')
    mdl.add_argument('--random-weights', action='store_true',
                     help='Rank with a randomly initialised model when no checkpoint is given (for trying the CLI '
                          'out; the ranking means nothing). Without it, a model with no weights is refused.')
    mdl.add_argument('--device', type=str, default=None, help='Default: cuda when available, else cpu.')
    mdl.add_argument('--precision', type=str, default='fp32', choices=PRECISIONS,
                     help='bf16 / fp16: weights cast as OpenCLIP casts them (images follow); amp / amp_bf16: fp32 '
                          'weights under autocast, as OpenCLIP\'s training and validation run them (its default, '
                          'amp, gives the validation metrics of results.jsonl).')
    out = p.add_argument_group('output')
    out.add_argument('--output-path', type=str, default='rank-results',
                     help='Writes <output-path>.csv and, with ground truth, <output-path>.json.')
    out.add_argument('--round', action='store_true', help='Round scores to integers before metrics (ordinal targets).')
    out.add_argument('--pairwise', action='store_true',
                     help='Also rank each prompt\'s set with the pair head (mean pairwise win probability).')
    out.add_argument('--contact-sheet', type=str, default=None, help='PNG of the ranked images per prompt.')
    out.add_argument('--sheet-max-images', type=int, default=40, help='Thumbnails per prompt in the contact sheet.')
    learned = p.add_argument_group('models with learned prompts (no --prompt)')
    learned.add_argument('--probabilities', action='store_true', help='Write each image\'s rank probabilities '
                         '(its non-scalar predictions) to the JSON output.')
    learned.add_argument('--prototypes', type=str, default=None,
                         help='Exported prototype file: rank with these (image tower only).')
    learned.add_argument('--export-prototypes', type=str, default=None,
                         help='Write the model\'s rank prototypes to this file (for --prototypes).')
    out.add_argument('--batch-size', type=int, default=64)
    out.add_argument('--csv-separator', type=str, default='\t')
    out.add_argument('--csv-img-key', type=str, default='filepath')
    out.add_argument('--csv-caption-key', type=str, default='title')
    out.add_argument('--csv-category-key', type=str, default='cname')
    out.add_argument('--csv-value-key', type=str, default='value')
    out.add_argument('--no-progress', action='store_true', help='No progress bar.')
    p.add_argument('--load-truncated-images', action='store_true',
                   help='Rank truncated images with what their file holds (and show them in the contact sheet) '
                        'instead of skipping them as unreadable.')
    for hook in registry.all_hooks('add_cli_args'):  # the sample types' own flags
        registry.import_function(hook)(p)
    return p


def folder_rows(args, prompts):
    """Every image under ``--images`` under each prompt (one empty prompt for models with learned prompts)."""
    from .files.images import find_images
    images = find_images(args.images, flag='--images')
    return [{'image': image, 'prompt': prompt, 'category': prompt, 'target': None}
            for prompt in prompts for image in images]


def rank_within_prompts(rows, key='score', out='rank', group='prompt'):
    """Rank 1 = highest ``key`` within each ``group``; rows without a finite score (skipped images) get no rank."""
    import math

    import torch

    from .inference import ranks_from_scores
    groups = {}
    for i, r in enumerate(rows):
        if r.get(key) is None or not math.isfinite(r[key]):
            r[out] = None
            continue
        groups.setdefault(r[group], []).append(i)
    for indices in groups.values():
        ranks = ranks_from_scores(torch.tensor([rows[i][key] for i in indices], dtype=torch.float64))
        for i, rank in zip(indices, ranks.tolist()):
            rows[i][out] = rank


def score_prompted(args, model, rows, transform, tokenizer):
    """Models ranking by an instruction: each row's score under its prompt; -> skipped [(image, reason)]."""
    from .inference import pairwise_scores, score_images, score_rows
    progress = not args.no_progress
    if args.csv:
        scores, skipped = score_rows(model, [r['image'] for r in rows], [r['prompt'] for r in rows], transform,
                                     tokenizer, batch_size=args.batch_size, progress=progress)
        for r, s in zip(rows, scores.tolist()):
            r['score'] = s
        skipped = [(rows[i]['image'], why) for i, why in skipped]
    else:  # a folder: each image decoded and through the tower once, scored under every prompt
        images = list(dict.fromkeys(r['image'] for r in rows))
        scores, skipped = score_images(model, images, args.prompt, transform, tokenizer,
                                       batch_size=args.batch_size, progress=progress)
        for t, prompt in enumerate(args.prompt):
            for i, r in enumerate(rows[t * len(images):(t + 1) * len(images)]):
                r['score'] = scores[i, t].item()
        skipped = [(images[i], why) for i, why in skipped]
    mark_skipped(rows, skipped)
    if args.pairwise:
        for prompt in dict.fromkeys(r['prompt'] for r in rows):
            members = [r for r in rows if r['prompt'] == prompt and r['skipped'] is None]
            pair, pair_skipped = pairwise_scores(model, [r['image'] for r in members], prompt, transform, tokenizer,
                                                 batch_size=args.batch_size, progress=progress)
            for r, s in zip(members, pair.tolist()):
                r['pairwise_score'] = s
            skipped += [(members[i]['image'], why) for i, why in pair_skipped]  # non-finite pair head outputs
        mark_skipped(rows, skipped)
    return skipped


def score_learned_prompts(args, model, rows, transform):
    """Models without instructions: every per-image prediction as a column. -> (skipped, extras)."""
    from .inference import predict_images
    images = [r['image'] for r in rows]
    outputs, skipped = predict_images(model, images, transform, batch_size=args.batch_size,
                                      progress=not args.no_progress)
    for name, values in outputs.items():
        if values.ndim == 1:
            for r, v in zip(rows, values.tolist()):
                r[name] = v
    probs = outputs.get('probs') if args.probabilities else None
    reasons = dict(skipped)  # a skipped image's probabilities are None (unreadable, or non-finite)
    extras = {'probabilities': [{'image': r['image'], 'probs': None if i in reasons else p}
                                for i, (r, p) in enumerate(zip(rows, probs.tolist()))]} if probs is not None else {}
    skipped = [(images[i], why) for i, why in skipped]
    mark_skipped(rows, skipped)
    return skipped, extras


def mark_skipped(rows, skipped):
    """Rows of skipped images (unreadable, or a non-finite prediction) keep their reason under 'skipped' and lose
    their predictions: never ranked."""
    reasons = dict(skipped)
    for r in rows:
        r['skipped'] = reasons.get(r['image'])
        if r['skipped'] is not None:
            for key in r.keys() - {'image', 'prompt', 'category', 'target', 'skipped'}:
                r[key] = None


def write_results(rows, path, pairwise):
    """The ranked rows per prompt in rank order, then the skipped images (reason in 'skipped', no score)."""
    from .files.atomic import atomic_write
    base = ['image', 'prompt', 'score', 'rank']
    predictions = [c for c in (rows[0] if rows else {}) if c not in (*base, 'category', 'target', 'skipped')
                   and not c.startswith('pairwise_')]
    columns = base + (['pairwise_score', 'pairwise_rank'] if pairwise else []) + predictions \
        + ['category', 'target', 'skipped']
    with atomic_write(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter=',', extrasaction='ignore')
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r['prompt'], r.get('rank') is None, r.get('rank') or 0)):
            writer.writerow({k: ('' if r.get(k) is None else r.get(k)) for k in columns})


def score(args, model, transform, tokenizer):
    """-> (rows, skipped, extras): the input read (the model's sample type reads CSVs) and scored."""
    task = registry.sample_type_of_model(model)
    if args.csv:
        rows = registry.import_function(task.read_rows)(args, model)
    else:
        rows = folder_rows(args, args.prompt if model.needs_prompt else [''])
    if model.needs_prompt:
        return rows, score_prompted(args, model, rows, transform, tokenizer), {}
    skipped, extras = score_learned_prompts(args, model, rows, transform)
    return rows, skipped, extras


def check_request(args, model):
    """What this model cannot do with these flags: one line each (ValueError)."""
    if args.csv and not registry.sample_type_of_model(model).read_rows:
        raise ValueError(f"{model.family_name} models have no CSV reader registered; rank a folder with --images.")
    if args.pairwise and not model.supports_pairwise:
        raise ValueError(f"{model.family_name} models have no pair head; rank without --pairwise.")
    if model.needs_prompt and args.images and not args.prompt:
        raise ValueError("--images needs at least one --prompt \"Rank the ...\".")
    if args.prompt and not model.needs_prompt:
        raise ValueError(f"{model.family_name} models take no prompt (their prompts are learned, "
                         f"{args.prompt[0]!r} would be ignored): rank without --prompt.")


def check_writable(path, flag, is_file=True):
    """Refuse, before the model loads, an output that could only fail after scoring everything: the folder of
    ``path`` must exist or be creatable (the nearest existing folder above it is a folder), and a probe file must
    write there. ``is_file``: ``path`` itself must not be a folder."""
    import os
    import tempfile
    target = Path(path)
    if is_file and target.is_dir():
        raise ValueError(f"{flag} {path} is a folder: give a file name.")
    probe = target.parent
    while not probe.exists() and probe != probe.parent:  # the nearest existing folder: where it would be made
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"{flag} {path}: {probe} is a file, not a folder: choose another {flag}.")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix='.open_clip_rank_probe_'):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path}: cannot write in folder {os.path.abspath(probe)} "
                         f"({type(err).__name__}: {err.strerror or err}): choose a writable folder for {flag}, or "
                         f"make that one writable.") from None


def check_outputs(args):
    """Every output location of this run writable (``check_writable``), before anything is loaded or scored."""
    output = Path(args.output_path)
    check_writable(output, '--output-path', is_file=False)  # a prefix: <output-path>.csv and .json
    for suffix in ('.csv', '.json'):
        if output.with_suffix(suffix).is_dir():
            raise ValueError(f"--output-path {args.output_path}: {output.with_suffix(suffix)} is a folder: choose "
                             f"another --output-path.")
    for flag, value in (('--contact-sheet', args.contact_sheet), ('--export-prototypes', args.export_prototypes)):
        if value:
            check_writable(value, flag)


def nothing_ranked(skipped) -> str:
    """The one line for a run where every image was skipped (unreadable or non-finite)."""
    from .inference import NON_FINITE_CAUSE
    reasons = dict(skipped)
    if not reasons:
        return "nothing could be ranked: the input holds no images."
    non_finite = sum(NON_FINITE_CAUSE in why for why in reasons.values())
    kinds = [f'{non_finite} with non-finite predictions' if non_finite else '',
             f'{len(reasons) - non_finite} unreadable' if len(reasons) > non_finite else '']
    image, why = next(iter(reasons.items()))
    return (f"nothing could be ranked: all {len(reasons)} image(s) were skipped ({', '.join(k for k in kinds if k)}); "
            f"first: {image}: {' '.join(str(why).split())}")


def main(argv=None):
    args = build_parser().parse_args(argv)
    from .files.images import truncated_images
    with truncated_images(args.load_truncated_images):  # every image this call decodes (files/images.py)
        return _main(args)


def _main(args):
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    from .integration.compat import quiet_torch_loggers
    quiet_torch_loggers()  # root INFO must not pass torch's internal reports
    try:
        if bool(args.csv) == bool(args.images):
            raise ValueError("give exactly one input: --data-to-inference/--csv CSV or --images FOLDER.")
        if args.csv and (args.image_root or args.csv_relative_paths):
            from .data.table import image_base
            image_base(args.csv, args.image_root, args.csv_relative_paths)  # refused before the model loads
        if args.prompt and any(not p.strip() for p in args.prompt):
            raise ValueError("--prompt is empty: give the instruction to rank by, e.g. --prompt \"Rank the numbers "
                             "of horse.\".")
        check_outputs(args)  # an unwritable output fails now, not after scoring everything
        from .inference import load_prototypes, load_rank_model
        model, transform, tokenizer = load_rank_model(args.model, args.config_path, args.checkpoint_path,
                                                      device=args.device, precision=args.precision,
                                                      random_weights=args.random_weights)
        if args.prototypes:
            load_prototypes(model, args.prototypes)
        check_request(args, model)
        if args.export_prototypes:
            from .inference import export_prototypes
            export_prototypes(model, args.export_prototypes)
            _logger.info(f"Prototypes: {args.export_prototypes}")
        rows, skipped, extras = score(args, model, transform, tokenizer)
    except (ValueError, FileNotFoundError) as err:
        print(f"open_clip_rank.rank: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:  # a kernel this torch lacks for the dtype on this device (e.g. fp16 on a CPU)
        if 'not implemented for' not in str(err) or args.precision == 'fp32':
            raise
        print(f"open_clip_rank.rank: error: --precision {args.precision} is not supported here by torch "
              f"({str(err).splitlines()[0]}): use --precision bf16 or fp32 on a CPU, or a GPU (--device cuda).",
              file=sys.stderr)
        return 2
    if not any(r['skipped'] is None for r in rows):
        print(f"open_clip_rank.rank: error: {nothing_ranked(skipped)}", file=sys.stderr)
        return 1
    rank_within_prompts(rows)
    if args.pairwise:
        rank_within_prompts(rows, key='pairwise_score', out='pairwise_rank')
    try:
        write_outputs(args, model, rows, skipped, extras)
    except OSError as err:  # checked before scoring; the disk can still fill up or change in between
        print(f"open_clip_rank.rank: error: cannot write the results ({type(err).__name__}: {err}): free space or "
              f"choose another --output-path.", file=sys.stderr)
        return 1
    return 0


def write_outputs(args, model, rows, skipped, extras):
    """<output>.csv, <output>.json (NaN written as null: valid JSON) and the contact sheet, each atomically."""
    from .evaluation.metrics import json_safe
    output = Path(args.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_results(rows, output.with_suffix('.csv'), args.pairwise)
    report = {'num_images': len({r['image'] for r in rows}), 'num_prompts': len({r['prompt'] for r in rows}),
              'num_ranked': len({r['image'] for r in rows if r['skipped'] is None}), 'precision': args.precision,
              'skipped': [{'image': image, 'reason': why} for image, why in skipped], **extras}
    task = registry.sample_type_of_model(model)
    if task.report:
        report.update(registry.import_function(task.report)(args, model, rows))
    from .files.atomic import atomic_write
    with atomic_write(output.with_suffix('.json'), 'w') as f:
        json.dump(json_safe(report), f, indent=2, allow_nan=False)
    if skipped:
        _logger.warning(f"{len(skipped)} image(s) skipped, not ranked (unreadable, or non-finite predictions); "
                        f"listed in {output.with_suffix('.json')} and, without a rank, in "
                        f"{output.with_suffix('.csv')}.")
    if args.contact_sheet:
        from .pictures.contact_sheet import make_contact_sheet
        make_contact_sheet([r for r in rows if r['skipped'] is None], args.contact_sheet,
                           max_images=args.sheet_max_images)
        _logger.info(f"Contact sheet: {args.contact_sheet}")
    _logger.info(f"Results: {output.with_suffix('.csv')} ({len(rows)} rows)")


if __name__ == '__main__':
    sys.exit(main())
