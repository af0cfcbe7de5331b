"""Keep the best-scored samples of a score folder (``rank --output-dir``): kept keys, DataComp uids, new shards.

    python -m open_clip_rank.select SCORES --plot buckets.png                      # look before cutting
    python -m open_clip_rank.select SCORES --top-fraction 0.3 --output kept/ [--per-prompt] [--reshard]
    python -m open_clip_rank.select SCORES --threshold 0.25 --output kept/ [--score-column expected_rank] [--lowest]

Rules (exactly one, unless only ``--plot``): ``--threshold X`` keeps rows scoring >= X (``--lowest``: <= X);
``--top-fraction F`` keeps the ceil(F * n) best of the n rows with a score, rows tied at the cut split by key
(an exact, deterministic count). Over all rows, or per prompt with ``--per-prompt``. NaN scores are never kept.

``--output DIR`` writes ``DIR/kept.parquet`` (the kept rows: key, prompt, score column, url / path / uid where
present), ``DIR/kept_uids.npy`` (DataComp's format, sorted unique ``u8,u8`` uid pairs, when every kept sample has
a 32-hex-digit uid; else the sorted unique keys as a NumPy unicode array), with ``--reshard`` new shards
``DIR/shards/kept-000000.tar ...`` holding every kept sample exactly once (its files copied unchanged) plus
OpenCLIP's ``sizes.json``, and last ``DIR/selection.json`` (the rule, the counts, the cut per prompt): present
means complete. Every file is written atomically. The last line printed is the new shards' URL and sample count
(for ``--train-data`` / ``--train-num-samples``) with ``--reshard``, else the counts.

``--plot PNG``: a score histogram and, per score bucket (``--buckets``, default deciles), a few samples, so a
person can see where to cut; with a rule, the cut is drawn in red.
"""
import argparse
import json
import logging
import os
import sys

_logger = logging.getLogger(__name__)
PROG = 'open_clip_rank.select'


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 2 (argparse's own prints the usage first)
        print(f"{PROG}: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser():
    p = _Parser(prog=f'python -m {PROG}', description=__doc__.split('\n\n')[0],
                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('scores', nargs='?', default=None, help='score folder written by the rank CLI (--output-dir)')
    p.add_argument('--scores', dest='scores_flag', default=None, metavar='DIR', help='the score folder, as a flag')
    rule = p.add_argument_group('rule (one of)')
    rule.add_argument('--threshold', type=float, default=None,
                      help='keep rows whose score is >= this (<= with --lowest)')
    rule.add_argument('--top-fraction', type=float, default=None,
                      help='keep the best ceil(F * n) of the n scored rows, F in (0, 1]; ties at the cut split by key')
    rule.add_argument('--per-prompt', action='store_true',
                      help='apply the rule to each prompt\'s rows on their own, not to all rows together')
    rule.add_argument('--score-column', default='score',
                      help='the numeric column to select by (e.g. expected_rank of an ordinal model)')
    rule.add_argument('--lowest', action='store_true', help='lower is better: keep the lowest scores')
    out = p.add_argument_group('output')
    out.add_argument('--output', default=None, metavar='DIR',
                     help='write kept.parquet, kept_uids.npy and selection.json (and shards/ with --reshard) here')
    out.add_argument('--reshard', action='store_true',
                     help='also write DIR/shards/kept-%%06d.tar holding every kept sample exactly once (folders '
                          'scored from shards)')
    out.add_argument('--shard-max-samples', type=int, default=10000, help='samples per new shard')
    look = p.add_argument_group('picture')
    look.add_argument('--plot', default=None, metavar='PNG',
                      help='score histogram and samples per score bucket (per prompt when there are several)')
    look.add_argument('--buckets', type=int, default=10, help='equal-count score buckets (10: deciles)')
    look.add_argument('--samples-per-bucket', type=int, default=8, help='thumbnails per bucket')
    return p


def check_args(p, args):
    if args.scores and args.scores_flag:
        p.error("give the score folder once: SCORE_DIR or --scores SCORE_DIR.")
    args.scores = args.scores or args.scores_flag
    if not args.scores:
        p.error("give the score folder: python -m open_clip_rank.select SCORE_DIR (what rank --output-dir wrote).")
    if not os.path.isdir(args.scores):
        p.error(f"score folder {args.scores} is not a folder.")
    rules = [f for f, v in (('--threshold', args.threshold), ('--top-fraction', args.top_fraction)) if v is not None]
    if len(rules) > 1:
        p.error("--threshold and --top-fraction are two rules: give one.")
    if not rules and not args.plot:
        p.error("give a rule (--threshold X or --top-fraction F), or --plot PNG alone to look at the scores first.")
    if args.top_fraction is not None and not 0 < args.top_fraction <= 1:
        p.error(f"--top-fraction must lie in (0, 1], got {args.top_fraction}.")
    if args.threshold is not None and args.threshold != args.threshold:
        p.error("--threshold is NaN: give a number.")
    if args.output and not rules:
        p.error("--output needs a rule: --threshold X or --top-fraction F.")
    if args.reshard and not args.output:
        p.error("--reshard writes into --output DIR: give one.")
    for flag, value, low in (('--shard-max-samples', args.shard_max_samples, 1), ('--buckets', args.buckets, 1),
                             ('--samples-per-bucket', args.samples_per_bucket, 0)):
        if value < low:
            p.error(f"{flag} must be >= {low}, got {value}.")
    if args.output:
        done = os.path.join(args.output, 'selection.json')
        shards = os.path.join(args.output, 'shards')
        if os.path.exists(done):
            p.error(f"--output {args.output} already holds a selection ({done}): give a new folder or delete it.")
        if os.path.isdir(shards) and any(n.startswith('kept-') and n.endswith('.tar') for n in os.listdir(shards)):
            p.error(f"--output {args.output} holds shards of an interrupted selection ({shards}): delete that "
                    f"folder or give a new --output.")
    return args


def _write_parquet(table, path, meta):
    import pyarrow.parquet as pq
    from .files.atomic import atomic_path
    table = table.replace_schema_metadata({b'open_clip_rank_selection': json.dumps(meta).encode()})
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def _write_npy(array, path):
    import numpy as np
    from .files.atomic import atomic_write
    with atomic_write(path, 'wb') as f:
        np.save(f, array)


def _write_json(obj, path):
    from .files.atomic import atomic_write
    with atomic_write(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2)


def select(args):
    """Run the selection; returns the last line to print."""
    import numpy as np

    from .scoring import curation
    from .scoring.outputs import read_manifest, skipped_samples
    table = curation.read_selection_table(args.scores, args.score_column)
    scores = curation.column_scores(table, args.score_column)
    scored = int((~np.isnan(scores)).sum())
    _logger.info(f"{args.scores}: {table.num_rows} rows, {scored} with a number in {args.score_column!r}")
    result, summary = None, None
    if args.threshold is not None or args.top_fraction is not None:
        indices, summary = curation.select_indices(table, args.threshold, args.top_fraction, args.per_prompt,
                                                   args.score_column, args.lowest)
        kept = table.take(indices)
        samples = curation.unique_samples(kept)
        for group in summary:
            _logger.info(f"{group['prompt'] if args.per_prompt else 'all rows'}: kept {group['kept']} of "
                         f"{group['scored']} scored rows (cut {group['cut']})")
        result = f"kept {samples.num_rows} samples ({kept.num_rows} of {table.num_rows} rows)"
        if args.reshard and not samples.num_rows:
            raise curation.CurationError(f"the rule keeps no sample of {args.scores} ({scored} rows with a number "
                                         f"in {args.score_column!r}): no shard to write; loosen the rule.")
        if args.output:
            manifest = read_manifest(args.scores) or {}
            rule = {'threshold': args.threshold, 'top_fraction': args.top_fraction, 'per_prompt': args.per_prompt,
                    'score_column': args.score_column, 'lowest': args.lowest}
            os.makedirs(args.output, exist_ok=True)
            _write_parquet(kept, os.path.join(args.output, 'kept.parquet'), rule)
            uids, kind = curation.uid_array(samples)
            _write_npy(uids, os.path.join(args.output, 'kept_uids.npy'))
            shards = None
            if args.reshard:
                folder = os.path.join(args.output, 'shards')
                sizes = curation.reshard(samples, folder, args.shard_max_samples)
                _write_json(sizes, os.path.join(folder, 'sizes.json'))
                url = curation.shards_url(folder, sizes)
                shards = {'url': url, 'samples': sum(sizes.values()), 'sizes': sizes}
                result = f"{url} {sum(sizes.values())}"
            _write_json({'scores': os.path.abspath(args.scores),
                         **{k: manifest.get(k) for k in ('model', 'checkpoint_sha256', 'prompts') if k in manifest},
                         'rule': rule, 'rows': table.num_rows, 'rows_scored': scored, 'rows_kept': kept.num_rows,
                         'samples_kept': samples.num_rows, 'groups': summary,
                         'uids': {'file': 'kept_uids.npy', 'format': kind, 'count': int(len(uids))},
                         'shards': shards, 'skipped_when_scoring': len(skipped_samples(args.scores))},
                        os.path.join(args.output, 'selection.json'))
            _logger.info(f"wrote {args.output}: kept.parquet, kept_uids.npy ({kind})"
                         + (f", {len(shards['sizes'])} shard(s)" if shards else '') + ', selection.json')
    if args.plot:
        picture = plot(args, table, summary)
        _logger.info(f"picture: {args.plot} ({picture['size'][0]}x{picture['size'][1]})")
        result = result or f"{args.plot}: {sum(s['buckets'] for s in picture['sections'])} bucket rows"
    return result


def plot(args, table, summary=None):
    from .pictures.score_buckets import make_score_buckets
    from .scoring import curation
    sections = curation.score_buckets(table, args.score_column, args.buckets, args.samples_per_bucket,
                                      lowest=args.lowest)
    rows = [row for s in sections for b in s['buckets'] for row in b['samples']]
    images = curation.images_by_key(rows)
    for row in rows:
        row['image'] = images.get((row.get('url') or None, row['key']))
    cuts = {}
    if summary:
        by_prompt = {g['prompt']: g['cut'] for g in summary}
        overall = summary[0]['cut'] if not args.per_prompt else None
        cuts = {s['prompt']: by_prompt.get(s['prompt'], overall) for s in sections}
    return make_score_buckets(sections, args.plot, args.samples_per_bucket, cuts=cuts, column=args.score_column)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format='%(asctime)s | %(levelname)s | %(message)s')
    p = build_parser()
    args = check_args(p, p.parse_args(argv))
    from .scoring.outputs import ScoreFolderError
    try:
        line = select(args)
    except ScoreFolderError as err:  # CurationError included
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"{PROG}: error: cannot write the selection ({type(err).__name__}: {err}): free space or choose "
              f"another --output.", file=sys.stderr)
        return 1
    print(line)
    return 0


if __name__ == '__main__':
    sys.exit(main())
