#!/usr/bin/env python
"""The official ranking-aware adapter's inference command, on open_clip_rank.

    python scripts/inference.py --config-path ./configs/model-config.json \
        --data-to-inference ./examples/example-count-df.csv --checkpoint-path CKPT

Same flags as the original script; it runs ``python -m open_clip_rank.rank`` (see its --help for more:
folders of images, --pairwise, --contact-sheet). Writes <output-path>.csv and <output-path>.json.
"""
import argparse
import logging
import sys

from open_clip_rank.rank import main as rank_main

_logger = logging.getLogger(__name__)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--config-path', required=True, help='Model config (official model-config.json schema).')
    p.add_argument('--data-to-inference', required=True, help='CSV (filepath, title, cname, value), tab-separated.')
    p.add_argument('--checkpoint-path', default=None, help='Checkpoint to load.')
    p.add_argument('--output-path', default='./tmp/result-stats', help='Output prefix (.csv and .json are added).')
    p.add_argument('--base-model-name', default=None, help='Accepted for compatibility; the config decides.')
    p.add_argument('--image-size', type=int, default=None, help='Accepted for compatibility; the config decides.')
    p.add_argument('--is-ordinal-regression', action='store_true', help='Round predictions (ordinal targets).')
    return p.parse_known_args(argv)


def main(argv=None):
    args, extra = parse(argv)
    if args.base_model_name or args.image_size:
        _logger.warning('--base-model-name / --image-size are taken from --config-path; the values given are ignored.')
    output = args.output_path[:-5] if args.output_path.endswith('.json') else args.output_path
    forwarded = ['--config-path', args.config_path, '--data-to-inference', args.data_to_inference,
                 '--output-path', output, *extra]
    if args.checkpoint_path:
        forwarded += ['--checkpoint-path', args.checkpoint_path]
    if args.is_ordinal_regression:
        forwarded.append('--round')
    return rank_main(forwarded)


if __name__ == '__main__':
    sys.exit(main())
