"""Evaluate rank checkpoints on held-out datasets in one command: ``python -m open_clip_rank.evaluate``.

The ranking counterpart of CLIP_benchmark's ``eval`` + ``build``: every checkpoint (``--checkpoint-path A B ...``)
ranks every dataset (``--data``: CSV or list files in the format of the model's data, one per dataset or
instruction; a folder, a glob, or files), exactly as the rank CLI ranks one ``--csv`` (same reader, scoring and
report: the model's sample type reads the file and computes the metrics), and writes

* ``DIR/<checkpoint>/<dataset>.json`` and ``.csv``: the rank CLI's ``--output-path`` outputs (the same metrics
  JSON: per category and mean SRCC / KRCC / PLCC / MAE / pairwise accuracy / the official pairwise accuracy for
  rank models; MAE and accuracy by expectation and argmax, and ordinality, for ordinal models);
* ``DIR/checkpoints.json``: what each ``<checkpoint>`` folder was made from (model, checkpoint file, precision);
* ``DIR/summary.csv``: one row per (checkpoint, dataset) with the mean metrics, over every checkpoint folder in DIR
  (this run's and earlier runs'), as ``clip_benchmark build`` tables its result files; also printed.

Every other flag is the rank CLI's (``--precision``, ``--device``, ``--batch-size``, ``--image-root``, ...): one
model (``--model`` / ``--config-path``) for every checkpoint. Family-agnostic: everything comes from the rank CLI
and, through it, the registry.
"""
import argparse
import csv
import glob
import json
import logging
import numbers
import os
import sys
from pathlib import Path

_logger = logging.getLogger(__name__)

PROG = 'python -m open_clip_rank.evaluate'
DATA_SUFFIXES = ('.csv', '.tsv', '.txt')  # rank CSVs, ordinal CSVs and list files
SUMMARY_NAME = 'summary.csv'
CHECKPOINTS_NAME = 'checkpoints.json'
# rank CLI flags this command sets itself, per checkpoint and dataset
OWN_FLAGS = {'csv': '--csv', 'images': '--images', 'shards': '--shards', 'prompt': '--prompt',
             'output_path': '--output-path', 'output_dir': '--output-dir', 'checkpoint_path': '--checkpoint-path',
             'contact_sheet': '--contact-sheet', 'export_prototypes': '--export-prototypes',
             'prototypes': '--prototypes'}
_COUNTS = ('num_images', 'num_prompts', 'num_ranked')


def build_parser():
    p = argparse.ArgumentParser(
        prog=PROG, allow_abbrev=False, description=__doc__.split('\n\n')[0],
        epilog="Every other flag is the rank CLI's (python -m open_clip_rank.rank --help), applied to every dataset: "
               "--model / --config-path, --precision (amp: as OpenCLIP's validation), --device, --batch-size, "
               "--workers, --image-root / --csv-relative-paths, the --csv-*-key columns, --csv-separator, --round, "
               "--pairwise, --random-weights, --no-progress.")
    p.add_argument('--data', action='append', required=True, metavar='PATH',
                   help="Datasets: a CSV / list file, a folder (its *.csv, *.tsv, *.txt files) or a glob "
                        "('data/*.csv'); repeat for more. Each file is one dataset, named by its file name without "
                        "the suffix.")
    p.add_argument('--checkpoint-path', '--checkpoints', dest='checkpoints', nargs='+', action='extend', default=[],
                   metavar='CKPT', help="Checkpoints to compare (official or OpenCLIP training, e.g. epoch_best.pt); "
                                        "several after one flag or the flag repeated. Default: the model's own "
                                        "weights (a local-dir: / hf-hub: source, or --random-weights).")
    p.add_argument('--output-dir', required=True, metavar='DIR',
                   help=f"DIR/<checkpoint>/<dataset>.json and .csv, DIR/{CHECKPOINTS_NAME}, DIR/{SUMMARY_NAME}. "
                        f"<checkpoint> is the file name without .pt, with as many parent folders as tell "
                        f"checkpoints apart (run-a-epoch_10).")
    return p


def _rank_parser():
    from .rank import build_parser as rank_build_parser
    parser = rank_build_parser()
    parser.prog = PROG
    return parser


def rank_template(rank_parser, rest):
    """The rank CLI's flags shared by every dataset; one line (ValueError) for those this command sets itself."""
    template, defaults = rank_parser.parse_args(rest), rank_parser.parse_args([])
    given = [flag for dest, flag in OWN_FLAGS.items() if getattr(template, dest) != getattr(defaults, dest)]
    if given:
        raise ValueError(f"{', '.join(given)}: set by this command per checkpoint and dataset (--data, "
                         f"--checkpoint-path, --output-dir); drop {'them' if len(given) > 1 else 'it'}.")
    if (template.model is None) == (template.config_path is None):
        raise ValueError("give exactly one of a model name (--model) or a model config file (--config-path).")
    return template


def find_datasets(specs):
    """[(name, path)] of the ``--data`` values, in order; one line (ValueError) for a missing one or a repeated name."""
    found = []
    for spec in specs:
        if os.path.isdir(spec):
            files = sorted(p for p in Path(spec).iterdir()
                           if p.is_file() and p.suffix.lower() in DATA_SUFFIXES and not p.name.startswith('.'))
        elif any(c in spec for c in '*?['):
            files = sorted(Path(p) for p in glob.glob(spec) if os.path.isfile(p))
        elif os.path.isfile(spec):
            files = [Path(spec)]
        else:
            raise ValueError(f"--data {spec}: no such file or folder.")
        if not files:
            raise ValueError(f"--data {spec}: no data files ({', '.join('*' + s for s in DATA_SUFFIXES)}) there.")
        found += files
    names = {}
    for path in found:
        if path.stem in names and names[path.stem] != path.resolve():
            raise ValueError(f"--data: two datasets named {path.stem} ({names[path.stem]} and {path}): the outputs "
                             f"are named by file name; rename one.")
        names[path.stem] = path.resolve()
    return [(name, str(path)) for name, path in names.items()]


def _safe(text: str) -> str:
    return ''.join(c if c.isalnum() or c in '-_.=+' else '-' for c in text).strip('-.') or 'model'


def checkpoint_labels(checkpoints, template):
    """The output folder name of each checkpoint: its file name without the suffix, with as many parent folders
    (leaving out 'checkpoints') as make the names distinct; the model's name for None (its own weights)."""
    if len(set(map(str, checkpoints))) != len(checkpoints):
        raise ValueError("--checkpoint-path: a checkpoint is given twice.")
    default = _safe(template.model or Path(template.config_path).stem)
    trails = [[] if c is None else [p for p in Path(os.path.abspath(c)).parent.parts[1:] if p != 'checkpoints']
              for c in checkpoints]
    stems = [default if c is None else _safe(Path(c).stem) for c in checkpoints]
    for depth in range(max((len(t) for t in trails), default=0) + 1):
        labels = [_safe('-'.join([*t[max(0, len(t) - depth):], s]) if depth else s)
                  for t, s in zip(trails, stems, strict=True)]
        if len(set(labels)) == len(labels):
            return labels
    return [f'{i}-{label}' for i, label in enumerate(labels)]


def main(argv=None):
    parser = build_parser()
    args, rest = parser.parse_known_args(None if argv is None else [str(a) for a in argv])
    rank_parser = _rank_parser()
    from .rank import check_writable
    try:
        template = rank_template(rank_parser, rest)
        datasets = find_datasets(args.data)
        checkpoints = list(args.checkpoints) or [None]
        for checkpoint in checkpoints:
            if checkpoint is not None and not os.path.isfile(checkpoint):
                raise ValueError(f"--checkpoint-path {checkpoint} does not exist.")
        labels = checkpoint_labels(checkpoints, template)
        check_writable(Path(args.output_dir) / SUMMARY_NAME, '--output-dir')
    except ValueError as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    from .files.images import truncated_images
    with truncated_images(template.load_truncated_images):
        return evaluate(args, rest, rank_parser, template, datasets, checkpoints, labels)


def evaluate(args, rest, rank_parser, template, datasets, checkpoints, labels) -> int:
    """Every checkpoint on every dataset, then the summary. 0; 1 when a dataset had nothing to rank; 2 on an error."""
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    from .integration.compat import quiet_torch_loggers
    quiet_torch_loggers()
    out = Path(args.output_dir)
    status = 0
    for checkpoint, label in zip(checkpoints, labels):
        try:
            model, transform, tokenizer = _load(template, checkpoint)
        except (ValueError, FileNotFoundError) as err:
            print(f"{PROG}: error: {err}", file=sys.stderr)
            return 2
        _record_checkpoint(out, label, template, checkpoint)
        for name, path in datasets:
            _logger.info(f"Evaluating {label} on {name} ({path})")
            code = _rank_dataset(rank_parser, rest, model, transform, tokenizer, path, out / label / name, checkpoint)
            if code == 2:
                return 2
            status = max(status, code)
        del model
    rows = summary_rows(out)
    write_summary(rows, out / SUMMARY_NAME)
    print(format_summary(rows))
    _logger.info(f"Summary: {out / SUMMARY_NAME} ({len(rows)} rows)")
    return status


def _load(template, checkpoint):
    from .inference import load_rank_model
    return load_rank_model(template.model, template.config_path, checkpoint, device=template.device,
                           precision=template.precision, random_weights=template.random_weights)


def _rank_dataset(rank_parser, rest, model, transform, tokenizer, path, output, checkpoint) -> int:
    """The rank CLI on one dataset with a loaded model (``rank.score`` and ``rank.report_rows``): its exit status."""
    from .rank import check_inputs, check_outputs, check_request, refusal, report_rows, score, score_folder
    from .scoring.job import Launch
    argv = [*rest, '--csv', path, '--output-path', str(output)]
    if checkpoint is not None:
        argv += ['--checkpoint-path', checkpoint]
    args = rank_parser.parse_args(argv)
    try:
        check_inputs(args)
        check_outputs(args)
        check_request(args, model)
        with score_folder(args) as folder:
            result = score(args, model, transform, tokenizer, folder, Launch())
            return report_rows(args, model, *result)
    except (ValueError, FileNotFoundError, RuntimeError) as err:
        message = refusal(err, args.precision)
        if message is None:
            raise
        print(f"{PROG}: error: {path}: {message}", file=sys.stderr)
        return 2


def _record_checkpoint(out: Path, label, template, checkpoint):
    """DIR/checkpoints.json: {label: what the folder was made from}, merged with earlier runs' entries."""
    from .files.atomic import atomic_write
    path = out / CHECKPOINTS_NAME
    out.mkdir(parents=True, exist_ok=True)
    try:
        known = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:
        known = {}
    known[label] = {'checkpoint': os.path.abspath(checkpoint) if checkpoint else None,
                    'model': template.model, 'config_path': template.config_path, 'precision': template.precision}
    with atomic_write(path, 'w') as f:
        json.dump(known, f, indent=2)


# --- the summary ------------------------------------------------------------------------------------------------

def headline_metrics(report: dict) -> dict:
    """The mean metrics of a rank CLI JSON report: ``metrics``' keys without a category, the report's other numbers
    (e.g. ordinality), and the pair head's as ``pairwise_<metric>``."""
    out = {k: v for k, v in (report.get('metrics') or {}).items() if '/' not in k}
    out.update({k: v for k, v in report.items() if k not in _COUNTS and isinstance(v, numbers.Real)
                and not isinstance(v, bool)})
    out.update({f'pairwise_{k}': v for k, v in (report.get('pairwise_metrics') or {}).items() if '/' not in k})
    return out


def summary_rows(out: Path) -> list:
    """One row per (checkpoint folder listed in DIR/checkpoints.json, dataset JSON in it), by dataset, then
    checkpoint."""
    path = out / CHECKPOINTS_NAME
    known = json.loads(path.read_text()) if path.is_file() else {}
    rows = []
    for label, source in known.items():
        for report_path in sorted((out / label).glob('*.json')):
            try:
                report = json.loads(report_path.read_text())
            except ValueError:
                _logger.warning(f"{report_path} is not JSON: left out of the summary.")
                continue
            rows.append({'checkpoint': label, 'dataset': report_path.stem, **headline_metrics(report),
                         **{k: report.get(k) for k in ('num_images', 'num_ranked', 'precision')},
                         'model': source.get('model') or source.get('config_path'),
                         'checkpoint_path': source.get('checkpoint')})
    return sorted(rows, key=lambda r: (r['dataset'], r['checkpoint']))


def _columns(rows):
    columns = ['checkpoint', 'dataset']
    for row in rows:
        columns += [k for k in row if k not in columns and k not in ('num_images', 'num_ranked', 'precision', 'model',
                                                                    'checkpoint_path')]
    return columns + ['num_images', 'num_ranked', 'precision', 'model', 'checkpoint_path']


def write_summary(rows, path):
    from .files.atomic import atomic_write
    with atomic_write(path, 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=_columns(rows), extrasaction='ignore')
        writer.writeheader()
        for row in rows:
            writer.writerow({k: '' if row.get(k) is None else row[k] for k in _columns(rows)})


def format_summary(rows) -> str:
    """Fixed-width table: checkpoint, dataset and each mean metric (counts and sources left to summary.csv)."""
    if not rows:
        return '(no results)'
    columns = [c for c in _columns(rows) if c not in ('num_images', 'num_ranked', 'precision', 'model',
                                                      'checkpoint_path', 'num_samples', 'num_categories')]

    def cell(value):
        if value is None:
            return '-'
        return f'{value:.4f}' if isinstance(value, numbers.Real) and not isinstance(value, bool) else str(value)

    table = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in table)) for i, c in enumerate(columns)]
    lines = ['  '.join(c.ljust(w) if i < 2 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(columns, widths, strict=True)))]
    lines.append('-' * len(lines[0]))
    lines += ['  '.join(v.ljust(w) if i < 2 else v.rjust(w) for i, (v, w) in enumerate(zip(line, widths, strict=True)))
              for line in table]
    return '\n'.join(lines)


if __name__ == '__main__':
    sys.exit(main())
