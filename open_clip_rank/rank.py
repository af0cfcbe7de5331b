"""Rank images by an instruction with a trained model: ``python -m open_clip_rank.rank``.

Two inputs:
* a CSV in the training format (filepath, title, cname[, value]): every image is scored under its
  own row's instruction; with a value column, per-category and mean metrics are written too;
* ``--images FOLDER --prompt "Rank the numbers of cat." [--prompt ...]``: every image under each prompt.

Ordinal models (``*-ordinal``) need no prompt (their rank prompts are learned): ``--images FOLDER`` or a
CSV / official list file (filepath[, value] or ``path label``); each image gets its expected and argmax
rank, MAE / accuracy when labels are present, optionally class probabilities and pictures.

Writes ``<output>.csv`` (image, prompt, score, rank[, category, target], skipped), ``<output>.json`` (the
skipped unreadable images, the metrics when ground truth is present), optionally a contact sheet PNG; each
file is written atomically. Unreadable images are listed as skipped, never ranked.
"""
import argparse
import csv
import json
import logging
import sys
from pathlib import Path

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = {'.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff'}


def build_parser():
    p = argparse.ArgumentParser(prog='python -m open_clip_rank.rank', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group('input (one of)')
    src.add_argument('--data-to-inference', '--csv', dest='csv', type=str, default=None,
                     help='CSV in the training format (filepath, title, cname[, value]).')
    src.add_argument('--images', type=str, default=None, help='Folder of images (searched recursively).')
    src.add_argument('--prompt', action='append', default=None,
                     help='Instruction for --images; repeat for several (each image is scored under each).')
    mdl = p.add_argument_group('model (one of --model / --config-path)')
    mdl.add_argument('--model', type=str, default=None, help='OpenCLIP model name (built-in, local-dir:, hf-hub:).')
    mdl.add_argument('--config-path', type=str, default=None,
                     help='Model config JSON, e.g. the official model-config.json.')
    mdl.add_argument('--checkpoint-path', type=str, default=None, help='Checkpoint (official or OpenCLIP training).')
    mdl.add_argument('--random-weights', action='store_true',
                     help='Rank with a randomly initialised model when no checkpoint is given (for trying the CLI '
                          'out; the ranking means nothing). Without it, a model with no weights is refused.')
    mdl.add_argument('--device', type=str, default=None, help='Default: cuda when available, else cpu.')
    mdl.add_argument('--precision', type=str, default='fp32', choices=['fp32', 'bf16', 'fp16'])
    out = p.add_argument_group('output')
    out.add_argument('--output-path', type=str, default='rank-results',
                     help='Writes <output-path>.csv and, with ground truth, <output-path>.json.')
    out.add_argument('--round', action='store_true', help='Round scores to integers before metrics (ordinal targets).')
    out.add_argument('--pairwise', action='store_true',
                     help='Also rank each prompt\'s set with the pair head (mean pairwise win probability).')
    out.add_argument('--contact-sheet', type=str, default=None, help='PNG of the ranked images per prompt.')
    out.add_argument('--sheet-max-images', type=int, default=40, help='Thumbnails per prompt in the contact sheet.')
    ordinal = p.add_argument_group('ordinal models')
    ordinal.add_argument('--probabilities', action='store_true', help='Write each image\'s rank probabilities '
                         'to the JSON output.')
    ordinal.add_argument('--plots', type=str, default=None, help='Folder for the prototype similarity picture '
                         '(and predicted-vs-true, with labels).')
    ordinal.add_argument('--prototypes', type=str, default=None,
                         help='Exported prototype file: rank with these (image tower only).')
    ordinal.add_argument('--export-prototypes', type=str, default=None,
                         help='Write the model\'s rank prototypes to this file (for --prototypes).')
    ordinal.add_argument('--image-root', type=str, default=None,
                         help='Folder that relative image paths of an ordinal CSV / list file resolve against.')
    out.add_argument('--batch-size', type=int, default=64)
    out.add_argument('--csv-separator', type=str, default='\t')
    out.add_argument('--csv-img-key', type=str, default='filepath')
    out.add_argument('--csv-caption-key', type=str, default='title')
    out.add_argument('--csv-category-key', type=str, default='cname')
    out.add_argument('--csv-value-key', type=str, default='value')
    out.add_argument('--no-progress', action='store_true', help='No progress bar.')
    return p


def find_images(folder):
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"--images {folder} is not a folder.")
    images = sorted(str(p) for p in folder.rglob('*') if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}.")
    return images


def read_csv_rows(args):
    """-> list of dicts with image, prompt, category, target (None when there is no value column).

    Same reader and checks as training data; images are not required to exist (unreadable ones are skipped).
    """
    from .data import load_rank_table
    table = load_rank_table(args.csv, img_key=args.csv_img_key, caption_key=args.csv_caption_key,
                            value_key=args.csv_value_key, category_key=args.csv_category_key, weight_key=None,
                            sep=args.csv_separator, require_category=False, require_value=False, check_files=False)
    targets = [None] * len(table) if table.values is None else table.values.tolist()
    return [{'image': path, 'prompt': prompt, 'category': table.category_names[c], 'target': target}
            for path, prompt, c, target in zip(table.paths, table.captions, table.category_ids.tolist(), targets)]


def rank_within_prompts(rows, key='score', out='rank', group='prompt'):
    """Rank 1 = highest ``key`` within each ``group``; rows without a score (skipped images) get no rank."""
    from .inference import ranks_from_scores
    import torch
    groups = {}
    for i, r in enumerate(rows):
        if r.get(key) is None:
            r[out] = None
            continue
        groups.setdefault(r[group], []).append(i)
    for indices in groups.values():
        ranks = ranks_from_scores(torch.tensor([rows[i][key] for i in indices], dtype=torch.float64))
        for i, rank in zip(indices, ranks.tolist()):
            rows[i][out] = rank


def score(args, model, transform, tokenizer):
    """-> list of result rows (image, prompt, score[, pairwise_score], category, target) and skipped images."""
    from .inference import pairwise_scores, score_images, score_rows
    progress = not args.no_progress
    if args.csv:
        rows = read_csv_rows(args)
        scores, skipped = score_rows(model, [r['image'] for r in rows], [r['prompt'] for r in rows], transform,
                                     tokenizer, batch_size=args.batch_size, progress=progress)
        for r, s in zip(rows, scores.tolist()):
            r['score'] = s
        skipped = [(rows[i]['image'], why) for i, why in skipped]
    else:
        images = find_images(args.images)
        scores, skipped = score_images(model, images, args.prompt, transform, tokenizer,
                                       batch_size=args.batch_size, progress=progress)
        rows = [{'image': image, 'prompt': prompt, 'score': scores[i, t].item(), 'category': prompt, 'target': None}
                for t, prompt in enumerate(args.prompt) for i, image in enumerate(images)]
        skipped = [(images[i], why) for i, why in skipped]
    mark_skipped(rows, skipped)
    if args.pairwise:
        for prompt in dict.fromkeys(r['prompt'] for r in rows):
            members = [r for r in rows if r['prompt'] == prompt and r['skipped'] is None]
            pair, _ = pairwise_scores(model, [r['image'] for r in members], prompt, transform, tokenizer,
                                      batch_size=args.batch_size, progress=progress)
            for r, s in zip(members, pair.tolist()):
                r['pairwise_score'] = s
    return rows, skipped


def mark_skipped(rows, skipped):
    """Rows of unreadable images keep their reason under 'skipped' and lose their predictions: never ranked."""
    reasons = dict(skipped)
    for r in rows:
        r['skipped'] = reasons.get(r['image'])
        if r['skipped'] is not None:
            for key in ('score', 'expected_rank', 'predicted_rank'):
                if key in r:
                    r[key] = None


def score_learned_prompts(args, model, transform):
    """Models without instructions (ordinal): every prediction per image. -> (rows, skipped, extras)."""
    from .data.ordinal import load_ordinal_table
    from .inference import predict_images
    if args.csv:
        table = load_ordinal_table(args.csv, model.num_ranks, img_key=args.csv_img_key, value_key=args.csv_value_key,
                                   sep=args.csv_separator, image_root=args.image_root, check_files=False,
                                   require_labels=False)
        images, targets = table.paths, table.eval_labels() or [None] * len(table)
    else:
        images = find_images(args.images)
        targets = [None] * len(images)
    outputs, skipped = predict_images(model, images, transform, batch_size=args.batch_size,
                                      progress=not args.no_progress)
    rows = [{'image': image, 'prompt': '', 'category': '', 'target': target} for image, target in zip(images, targets)]
    for name, values in outputs.items():
        if values.ndim == 1:
            for r, v in zip(rows, values.tolist()):
                r[name] = v
    probs = outputs.get('probs') if args.probabilities else None
    extras = {'probabilities': [{'image': r['image'], 'probs': p} for r, p in zip(rows, probs.tolist())]} \
        if probs is not None else {}
    skipped = [(images[i], why) for i, why in skipped]
    mark_skipped(rows, skipped)
    return rows, skipped, extras


def write_results(rows, path, pairwise):
    """The ranked rows per prompt in rank order, then the skipped images (reason in 'skipped', no score)."""
    from .checkpoint_files import atomic_write
    columns = ['image', 'prompt', 'score', 'rank'] + (['pairwise_score', 'pairwise_rank'] if pairwise else []) \
        + [c for c in ('expected_rank', 'predicted_rank') if rows and c in rows[0]] \
        + ['category', 'target', 'skipped']
    with atomic_write(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=columns, delimiter=',', extrasaction='ignore')
        writer.writeheader()
        for r in sorted(rows, key=lambda r: (r['prompt'], r.get('rank') is None, r.get('rank') or 0)):
            writer.writerow({k: ('' if r.get(k) is None else r.get(k)) for k in columns})


# The pairwise score is a mean win probability in [0, 1]: only order-based metrics compare it with targets
# (PLCC and MAE would measure its scale against the targets', which means nothing).
PAIRWISE_METRICS = ('srcc', 'krcc', 'pair_acc')


def order_metrics_only(metrics):
    """The entries of a ``ranking_metrics`` dict that depend on the order of the scores alone."""
    from .metrics import METRIC_NAMES
    return {k: v for k, v in metrics.items()
            if k.rpartition('/')[2] in PAIRWISE_METRICS or k.rpartition('/')[2] not in METRIC_NAMES}


def compute_metrics(rows, round_scores=False, key='score'):
    import numpy as np
    from .metrics import ranking_metrics, round_predictions
    usable = [r for r in rows if r['target'] is not None and r.get(key) is not None and np.isfinite(r[key])]
    if not usable:
        return None
    preds = np.array([r[key] for r in usable])
    if round_scores:
        preds = round_predictions(preds)
    return ranking_metrics(preds, np.array([r['target'] for r in usable]), [r['category'] for r in usable])


def ordinal_report(args, model, rows, extras):
    """Metrics (MAE / accuracy by expectation and argmax) when labels are present, pictures, exported prototypes."""
    from .inference import export_prototypes
    from .metrics import ordinal_metrics, prototype_ordinality
    report = dict(extras)
    prototypes = model.rank_prototypes().float().cpu().numpy()
    report['ordinality'] = prototype_ordinality(prototypes)
    labelled = [r for r in rows if r['target'] is not None and r.get('expected_rank') == r.get('expected_rank')]
    if labelled:
        report['metrics'] = ordinal_metrics([r['expected_rank'] for r in labelled],
                                            [r['predicted_rank'] for r in labelled], [r['target'] for r in labelled])
        print('\n'.join(f"{name:>8}: {value:.4f}" for name, value in report['metrics'].items()))
    if args.plots:
        from .plots import confusion_png, prototype_similarity_png
        prototype_similarity_png(prototypes, Path(args.plots) / 'prototype_similarity.png', report['ordinality'])
        if labelled:
            confusion_png([r['target'] for r in labelled], [r['predicted_rank'] for r in labelled], model.num_ranks,
                          Path(args.plots) / 'predicted_vs_true.png')
    if args.export_prototypes:
        export_prototypes(model, args.export_prototypes)
        _logger.info(f"Prototypes: {args.export_prototypes}")
    return report


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    from .compat import quiet_torch_loggers
    quiet_torch_loggers()  # root INFO must not pass torch's internal reports
    extras = None
    try:
        if bool(args.csv) == bool(args.images):
            raise ValueError("give exactly one input: --data-to-inference/--csv CSV or --images FOLDER.")
        if args.prompt and any(not p.strip() for p in args.prompt):
            raise ValueError("--prompt is empty: give the instruction to rank by, e.g. --prompt \"Rank the numbers "
                             "of horse.\".")
        from .inference import load_prototypes, load_rank_model
        model, transform, tokenizer = load_rank_model(args.model, args.config_path, args.checkpoint_path,
                                                      device=args.device, precision=args.precision,
                                                      random_weights=args.random_weights)
        if args.prototypes:
            load_prototypes(model, args.prototypes)
        if not model.needs_prompt:
            if args.pairwise:
                raise ValueError(f"{model.family_name} models have no pair head; rank without --pairwise.")
            rows, skipped, extras = score_learned_prompts(args, model, transform)
        else:
            if args.images and not args.prompt:
                raise ValueError("--images needs at least one --prompt \"Rank the ...\".")
            rows, skipped = score(args, model, transform, tokenizer)
    except (ValueError, FileNotFoundError) as err:
        print(f"open_clip_rank.rank: error: {err}", file=sys.stderr)
        return 2
    rank_within_prompts(rows)
    if args.pairwise:
        rank_within_prompts(rows, key='pairwise_score', out='pairwise_rank')
    output = Path(args.output_path)
    output.parent.mkdir(parents=True, exist_ok=True)
    write_results(rows, output.with_suffix('.csv'), args.pairwise)
    report = {'num_images': len({r['image'] for r in rows}), 'num_prompts': len({r['prompt'] for r in rows}),
              'num_ranked': len({r['image'] for r in rows if r['skipped'] is None}),
              'skipped': [{'image': image, 'reason': why} for image, why in skipped]}
    metrics = compute_metrics(rows, args.round) if extras is None else None
    if extras is not None:
        report.update(ordinal_report(args, model, rows, extras))
    if metrics is not None:
        from .metrics import format_metrics_table
        report['metrics'] = metrics
        print(format_metrics_table(metrics))
        if args.pairwise:  # mean win probabilities: ranked, not rounded; order-based metrics only
            pairwise = compute_metrics(rows, key='pairwise_score')
            if pairwise is not None:
                report['pairwise_metrics'] = order_metrics_only(pairwise)
                print('\nPair head (--pairwise, mean win probability; order-based metrics only):')
                print(format_metrics_table(report['pairwise_metrics'], metric_names=PAIRWISE_METRICS))
    from .checkpoint_files import atomic_write
    with atomic_write(output.with_suffix('.json'), 'w') as f:
        json.dump(report, f, indent=2)
    if skipped:
        _logger.warning(f"{len(skipped)} unreadable image(s) skipped, not ranked; listed in "
                        f"{output.with_suffix('.json')} and, without a rank, in {output.with_suffix('.csv')}.")
    if args.contact_sheet:
        from .contact_sheet import make_contact_sheet
        make_contact_sheet([r for r in rows if r['skipped'] is None], args.contact_sheet,
                           max_images=args.sheet_max_images)
        _logger.info(f"Contact sheet: {args.contact_sheet}")
    _logger.info(f"Results: {output.with_suffix('.csv')} ({len(rows)} rows)")
    return 0


if __name__ == '__main__':
    sys.exit(main())
