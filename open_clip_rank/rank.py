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
import contextlib
import csv
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from . import registry

_logger = logging.getLogger(__name__)

RESERVED_COLUMNS = ('key', 'prompt', 'score', 'url', 'path', 'category', 'target')  # the score files' own columns
PRECISIONS = ('fp32', 'bf16', 'fp16', 'amp', 'amp_bf16', 'amp_bfloat16')  # OpenCLIP's --precision names


def build_parser():
    registry.load_plugins()  # their sample types may add flags
    p = argparse.ArgumentParser(prog='python -m open_clip_rank.rank', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_argument_group('input (one of)')
    src.add_argument('--data-to-inference', '--csv', dest='csv', type=str, default=None,
                     help='CSV in the training format of the model\'s data (adapter: filepath, title, cname[, value]).')
    src.add_argument('--images', type=str, default=None, help='Folder of images (searched recursively).')
    src.add_argument('--shards', type=str, default=None,
                     help='Webdataset shards, read as OpenCLIP reads them (brace-expanded, local, pipe: and other '
                          'URLs, "::" between lists), e.g. "/data/{00000..00999}.tar". Needs --output-dir.')
    src.add_argument('--prompt', action='append', default=None,
                     help='Instruction for --images / --shards; repeat for several (each image is scored under each).')
    src.add_argument('--shard-image-key', type=str, default=None,
                     help='Shard entry holding the image. Default: the first of jpg, jpeg, png, webp.')
    src.add_argument('--shard-prompt-key', type=str, default=None,
                     help='Key of each shard sample\'s json holding its own instruction (instead of --prompt).')
    src.add_argument('--shard-keep-keys', type=str, nargs='*', default=None,
                     help='Keys of each shard sample\'s json copied into the score files (e.g. uid, caption); not '
                          'the files\' own column names (key, prompt, score, url, path, category, target).')
    src.add_argument('--shard-target-key', type=str, default=None,
                     help='Key of each shard sample\'s json holding its ground truth (e.g. value): written as the '
                          'target column, and the metrics of the model\'s sample type go to DIR/metrics.json.')
    src.add_argument('--shard-category-key', type=str, default=None,
                     help='Key of each shard sample\'s json holding its category (e.g. cname), for per-category '
                          'metrics.')
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
    out.add_argument('--output-path', type=str, default=None,
                     help='Writes <output-path>.csv (every image ranked per prompt) and <output-path>.json (skipped '
                          'images, metrics with ground truth). Default: rank-results, unless --output-dir is given.')
    out.add_argument('--output-dir', type=str, default=None,
                     help='Score folder: one Parquet file per partition (a shard, or --partition-size files / rows), '
                          'each written atomically, plus manifest.json; a rerun does only what is missing, under '
                          'torchrun each process scores its share. Memory stays flat in the number of images.')
    out.add_argument('--partition-size', type=int, default=10_000,
                     help='Images (folder) or rows (CSV) per partition of --output-dir.')
    out.add_argument('--workers', type=int, default=2,
                     help='DataLoader worker processes decoding and resizing images (0: in the main process).')
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


def mark_skipped(rows, skipped):
    """Rows of skipped images (unreadable, or a non-finite prediction) keep their reason under 'skipped' and lose
    their predictions: never ranked."""
    reasons = dict(skipped)
    for r in rows:
        r['skipped'] = r.get('skipped') or reasons.get(r['image'])
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


def add_pairwise_scores(args, model, rows, transform, tokenizer):
    """``--pairwise``: each prompt's ranked images again through the pair head (mean pairwise win probability);
    images whose pair-head outputs are non-finite join the skipped."""
    from .inference import pairwise_scores
    skipped = []
    for prompt in dict.fromkeys(r['prompt'] for r in rows):
        members = [r for r in rows if r['prompt'] == prompt and r['skipped'] is None]
        pair, pair_skipped = pairwise_scores(model, [r['image'] for r in members], prompt, transform, tokenizer,
                                             batch_size=args.batch_size, progress=not args.no_progress)
        for r, s in zip(members, pair.tolist()):
            r['pairwise_score'] = s
        skipped += [(members[i]['image'], why) for i, why in pair_skipped]
    return skipped


def score(args, model, transform, tokenizer, folder, launch):
    """Score the input into ``folder`` (this process's share, ``scoring/job.py``). On the main process -> the rank
    CLI's rows (rows, skipped [(image, reason)], extras) read back from the finished folder when the outputs need
    them (``--output-path``, or ground truth for metrics), else a ``FolderSummary`` from the files' metadata (memory
    flat in the number of images); elsewhere None."""
    from .scoring.job import run_job
    task = registry.sample_type_of_model(model)
    if task.cli_transform:  # e.g. the preprocessing a training option used
        transform = registry.import_function(task.cli_transform)(args, model, transform)
    plan, _ = run_job(args, model, transform, tokenizer, folder, launch)
    if not launch.is_main:
        return None
    if args.output_path is None and not plan_has_targets(plan):
        return FolderSummary.of(folder)
    return rows_for_outputs(args, model, transform, tokenizer, folder, plan)


def plan_has_targets(plan) -> bool:
    return bool(plan.truth_keys) or any(item.get('target') is not None for p in plan.partitions for item in p.items)


class FolderSummary:
    """What a finished score folder holds, from its files' metadata only."""

    def __init__(self, rows, skipped):
        self.rows, self.skipped = rows, skipped

    @classmethod
    def of(cls, folder):
        from .scoring import outputs
        metas = [outputs.partition_metadata(path) for path in outputs.completed_partitions(folder).values()]
        return cls(sum(m['num_rows'] for m in metas), [(s.get('key') or s.get('url'), s['reason'])
                                                       for m in metas for s in m['skipped']])


def rows_for_outputs(args, model, transform, tokenizer, folder, plan):
    from .scoring.job import rows_from_folder
    rows = rows_from_folder(folder, plan)
    extras = {}
    if args.probabilities and any('probs' in r for r in rows):
        extras['probabilities'] = [{'image': r['image'], 'probs': r.get('probs')} for r in rows]
    for r in rows:
        r.pop('probs', None)  # not a CSV column
    skipped = list(dict.fromkeys((r['image'], r['skipped']) for r in rows if r['skipped'] is not None))
    if args.pairwise:
        more = add_pairwise_scores(args, model, rows, transform, tokenizer)
        mark_skipped(rows, more)
        skipped += more
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
    if args.output_dir:
        check_writable(Path(args.output_dir) / 'manifest.json', '--output-dir')
    if args.output_path is None:
        return
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


def check_inputs(args):
    """The flags alone (before the model loads): one line each (ValueError)."""
    if sum(bool(x) for x in (args.csv, args.images, args.shards)) != 1:
        raise ValueError("give exactly one input: --data-to-inference/--csv CSV, --images FOLDER or --shards URL.")
    if args.csv and (args.image_root or args.csv_relative_paths):
        from .data.table import image_base
        image_base(args.csv, args.image_root, args.csv_relative_paths)
    if args.prompt and any(not p.strip() for p in args.prompt):
        raise ValueError("--prompt is empty: give the instruction to rank by, e.g. --prompt \"Rank the numbers "
                         "of horse.\".")
    if args.shards and not args.output_dir:
        raise ValueError("--shards writes a score folder: add --output-dir DIR (one Parquet file per shard).")
    if args.shards and (args.pairwise or args.contact_sheet):
        raise ValueError("--pairwise and --contact-sheet read images by path: rank --images or --csv for them, "
                         "not --shards.")
    reserved = [k for k in (args.shard_keep_keys or ()) if k in RESERVED_COLUMNS]
    if reserved:
        raise ValueError(f"--shard-keep-keys {' '.join(reserved)}: the score files already have a column of that name "
                         f"({', '.join(RESERVED_COLUMNS)}); keep the json key under another name in the shards, or "
                         f"drop it.")
    if args.prompt and args.shard_prompt_key:
        raise ValueError("give either --prompt (every image under each) or --shard-prompt-key (each sample's own "
                         "instruction), not both.")
    if args.workers < 0 or args.partition_size < 1:
        raise ValueError(f"--workers must be >= 0 and --partition-size >= 1 (got {args.workers}, "
                         f"{args.partition_size}).")
    if args.output_dir is None and args.output_path is None:
        args.output_path = 'rank-results'  # today's outputs, scored through a temporary folder
    if args.output_path is None and (args.pairwise or args.contact_sheet):
        raise ValueError("--pairwise and --contact-sheet write beside the ranked CSV: add --output-path PREFIX.")


def _main(args):
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    from .integration.compat import quiet_torch_loggers
    from .scoring.job import launch_from_env
    quiet_torch_loggers()  # root INFO must not pass torch's internal reports
    launch = launch_from_env()  # under torchrun: this process's rank and share
    try:
        check_inputs(args)
        check_outputs(args)  # an unwritable output fails now, not after scoring everything
        model, transform, tokenizer = _load_model(args, launch)
    except (ValueError, FileNotFoundError) as err:
        print(f"open_clip_rank.rank: error: {err}", file=sys.stderr)
        return 2
    with score_folder(args) as folder:
        try:
            result = score(args, model, transform, tokenizer, folder, launch)
        except (ValueError, FileNotFoundError, RuntimeError) as err:
            message = refusal(err, args.precision)
            if message is None:
                raise
            print(f"open_clip_rank.rank: error: {message}", file=sys.stderr)
            return 2
        finally:
            from .scoring.job import end_process_group
            end_process_group(launch)
        if result is None:  # not the main process: its share is on disk
            return 0
        if isinstance(result, FolderSummary):
            return _report_summary(args, result)
        return report_rows(args, model, *result)


def refusal(err: Exception, precision: str):
    """The one line a scoring error becomes (bad input, or a precision torch cannot run here), or None for an error
    that is a bug to report (re-raised)."""
    if isinstance(err, (ValueError, FileNotFoundError)):
        return str(err)
    return unsupported_precision(err, precision) if isinstance(err, RuntimeError) else None


def unsupported_precision(err: RuntimeError, precision: str):
    """The one line for a kernel this torch lacks at ``precision`` on this device (e.g. fp16 on a CPU), or None when
    ``err`` is something else."""
    if 'not implemented for' not in str(err) or precision == 'fp32':
        return None
    return (f"--precision {precision} is not supported here by torch ({str(err).splitlines()[0]}): use --precision "
            f"bf16 or fp32 on a CPU, or a GPU (--device cuda).")


def _load_model(args, launch):
    from .inference import load_prototypes, load_rank_model
    device = args.device
    if device is None and launch.world_size > 1:
        import torch
        device = f'cuda:{launch.local_rank}' if torch.cuda.is_available() else 'cpu'  # one GPU per process
    model, transform, tokenizer = load_rank_model(args.model, args.config_path, args.checkpoint_path, device=device,
                                                  precision=args.precision, random_weights=args.random_weights)
    if args.prototypes:
        load_prototypes(model, args.prototypes)
    check_request(args, model)
    if args.shards and model.needs_prompt and not (args.prompt or args.shard_prompt_key):
        raise ValueError("--shards needs --prompt \"Rank the ...\" or --shard-prompt-key KEY (each sample's own "
                         "instruction in its json).")
    if args.export_prototypes and launch.is_main:
        from .inference import export_prototypes
        export_prototypes(model, args.export_prototypes)
        _logger.info(f"Prototypes: {args.export_prototypes}")
    from .scoring.job import start_process_group
    start_process_group(launch)
    return model, transform, tokenizer


@contextlib.contextmanager
def score_folder(args):
    """``--output-dir``, or a temporary score folder for today's small outputs (removed afterwards)."""
    if args.output_dir:
        yield args.output_dir
        return
    with tempfile.TemporaryDirectory(prefix='open_clip_rank-scores-') as folder:
        yield folder


def _report_summary(args, summary: FolderSummary):
    """``--output-dir`` alone, no ground truth: the counts (the scores are in the folder)."""
    if not summary.rows:
        print(f"open_clip_rank.rank: error: {nothing_ranked(summary.skipped)}", file=sys.stderr)
        return 1
    _logger.info(f"Scores: {args.output_dir} ({summary.rows} rows, {len(summary.skipped)} skipped)")
    return 0


def report_rows(args, model, rows, skipped, extras):
    """The main process's outputs: <output>.csv/.json (and metrics) from the finished score folder."""
    if not any(r['skipped'] is None for r in rows):
        print(f"open_clip_rank.rank: error: {nothing_ranked(skipped)}", file=sys.stderr)
        return 1
    if args.output_path is None:
        _logger.info(f"Scores: {args.output_dir} ({sum(r['skipped'] is None for r in rows)} rows, "
                     f"{len(skipped)} skipped)")
        _write_folder_metrics(args, model, rows)
        return 0
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


def _write_folder_metrics(args, model, rows):
    """With ground truth in the score files, the sample type's metrics as ``DIR/metrics.json``."""
    task = registry.sample_type_of_model(model)
    if not task.report or not any(r.get('target') is not None for r in rows):
        return
    from .files.atomic import json_safe
    from .files.atomic import atomic_write
    report = {'precision': args.precision, **registry.import_function(task.report)(args, model, rows)}
    path = os.path.join(args.output_dir, 'metrics.json')
    with atomic_write(path, 'w') as f:
        json.dump(json_safe(report), f, indent=2, allow_nan=False)
    _logger.info(f"Metrics: {path}")


def write_outputs(args, model, rows, skipped, extras):
    """<output>.csv, <output>.json (NaN written as null: valid JSON) and the contact sheet, each atomically."""
    from .files.atomic import json_safe
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
