"""Convert a sample type's training data (e.g. a rank CSV) into webdataset shards for ``--dataset-type webdataset``.

    python -m open_clip_rank.make_shards rank.csv out/ --shard-size 1000 [--sample-type rank]

Reads the data with the same validation as training (the sample type's ``shard_records``: the same bad rows
are refused, one line each), writes ``out/000000.tar ...`` (each written to a temporary name and
renamed when complete) with ``<key>.<image ext>`` + ``<key>.json`` per row and OpenCLIP's ``sizes.json``,
and prints as its last line the brace-expanded URL for ``--train-data`` and the sample count for
``--train-num-samples``, e.g. ``out/{000000..000004}.tar 1000``.

Every image is decoded first (``files/images.py:open_rgb``, as training decodes it): one that does not decode
(an empty file, a text file named .jpg, a truncated file, a decompression bomb) is left out, logged and listed in
a summary at the end. Each sample's json names its image file (``source_path``), so a sample skipped later in
training names it too.
"""
import argparse
import io
import itertools
import json
import logging
import os
import sys
import tarfile
import time

from . import registry
from .data.table import RankDataError
from .files.atomic import atomic_path, atomic_write
from .files.images import SHARD_IMAGE_KEYS, open_rgb

_logger = logging.getLogger(__name__)

# files in a format a shard holds are copied as they are (.jpeg as 'jpg'); others are re-encoded as png
KEEP_EXTENSIONS = {f'.{key}': 'jpg' if key == 'jpeg' else key for key in SHARD_IMAGE_KEYS}


def parse_args(argv=None):
    registry.load_plugins()  # their sample types may write shards
    p = argparse.ArgumentParser(prog='python -m open_clip_rank.make_shards', description=__doc__.split('\n\n')[0])
    p.add_argument('csv', help='data in the training format of --sample-type (e.g. a rank CSV: filepath, title, cname, '
                               'value[, sample_weights_by_class])')
    p.add_argument('out', help='output folder for the shards and sizes.json')
    p.add_argument('--shard-size', type=int, default=1000, help='samples per shard')
    choices = tuple(name for name, spec in registry.SAMPLE_TYPES.items() if spec.shard_records)
    p.add_argument('--sample-type', choices=choices, default=choices[0],
                   help='the --csv-dataset-sample-type the shards will train')
    p.add_argument('--csv-separator', default='\t')
    p.add_argument('--csv-img-key', default='filepath')
    p.add_argument('--csv-caption-key', default='title')
    p.add_argument('--csv-value-key', default='value')
    p.add_argument('--image-root', default=None, help='folder that relative image paths of the CSV / list file '
                                                       'resolve against (default: the current directory)')
    p.add_argument('--csv-relative-paths', action='store_true',
                   help='relative image paths resolve against the folder of the CSV / list file (not with '
                        '--image-root)')
    p.add_argument('--seed', type=int, default=0, help='rows are shuffled with this seed so that shards mix '
                                                    'categories (streamed buckets fill evenly)')
    p.add_argument('--no-shuffle', action='store_true', help='keep the CSV row order')
    p.add_argument('--no-progress', action='store_true')
    p.add_argument('--load-truncated-images', action='store_true',
                   help='Keep truncated images: what such a file holds is decoded and stored re-encoded as a complete '
                        'png (training then needs no flag). Default: a truncated image is left out as unreadable.')
    for hook in registry.all_hooks('add_shard_args'):  # the sample types' own flags
        registry.import_function(hook)(p)
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}.")
    if args.image_root and args.csv_relative_paths:
        p.error("--image-root and --csv-relative-paths both say where relative image paths resolve: give one.")
    return args


def _image(path, load_truncated=False):
    """(extension, bytes): the file as it is for jpg/png/webp, else (and a truncated file kept with
    ``load_truncated``) the decoded RGB image re-encoded as png. Raises ``OSError`` when it does not decode."""
    ext = KEEP_EXTENSIONS.get(os.path.splitext(path)[1].lower())
    with open(path, 'rb') as f:
        data = f.read()
    try:
        image = open_rgb(data, load_truncated=False)  # as training will decode it
    except OSError:
        if not load_truncated:
            raise
        image, ext = open_rgb(data, load_truncated=True), None  # stored complete: readable without the flag
    if ext is not None:
        return ext, data
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return 'png', buffer.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def _readable_samples(records, bar, rejected, load_truncated=False):
    """(extension, bytes, json with ``source_path``) per record whose image decodes; one that does not is left
    out, warned and listed in ``rejected`` as (path, reason)."""
    for path, meta in records:
        bar.update(1)
        try:
            ext, data = _image(path, load_truncated)
        except (OSError, ValueError) as err:  # open_rgb raises OSError (PIL's UnidentifiedImageError is one)
            rejected.append((str(path), f'{type(err).__name__}: {err}'))
            _logger.warning(f"skipped unreadable image {path} ({type(err).__name__}: {err}); "
                            f"{len(rejected)} skipped so far")
            continue
        yield ext, data, {**meta, 'source_path': str(path)}


def _rejects_summary(rejected, limit=20):
    """One log message listing the images left out (the first ``limit``, then a count)."""
    lines = [f"  {path} ({why})" for path, why in rejected[:limit]]
    if len(rejected) > limit:
        lines.append(f"  ... and {len(rejected) - limit} more (each logged above)")
    return f"{len(rejected)} unreadable image(s) left out of the shards:\n" + '\n'.join(lines)


def write_shards(records, out, shard_size, total=None, progress=True, load_truncated=False, rejected=None):
    """Write shards atomically (each through ``files/atomic.py``); returns {shard name: sample count}.

    Every image is decoded first (``open_rgb``, as training decodes it): one that does not decode is left out
    with a warning, appended to ``rejected`` (a list, when given) as (path, reason) and listed in a summary at
    the end. ``load_truncated``: keep truncated images, re-encoded complete as png."""
    from tqdm import tqdm
    os.makedirs(out, exist_ok=True)
    sizes, written = {}, 0
    rejected = [] if rejected is None else rejected
    with tqdm(total=total, unit='img', desc='make_shards', disable=not progress, file=sys.stderr) as bar:
        samples = _readable_samples(records, bar, rejected, load_truncated)
        for first in samples:  # a shard holds the next shard_size readable samples
            name = f"{written // shard_size:06d}.tar"
            with atomic_path(os.path.join(out, name)) as tmp, tarfile.open(tmp, 'w') as tar:
                for ext, data, meta in itertools.chain([first], itertools.islice(samples, shard_size - 1)):
                    key = f"{written:09d}"
                    _add(tar, f"{key}.{ext}", data)
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
                    written += 1
            sizes[name] = written - sum(sizes.values())
    if rejected:
        _logger.warning(_rejects_summary(rejected))
    if not sizes:
        raise RankDataError(f"no readable image among {len(rejected)} row(s): nothing to write to {out}.")
    with atomic_write(os.path.join(out, 'sizes.json')) as f:
        json.dump(sizes, f, indent=1)
    return sizes


def shard_url(out, sizes) -> str:
    names = sorted(sizes)
    stem = lambda n: n[:-len('.tar')]  # noqa: E731
    inner = names[0] if len(names) == 1 else f"{{{stem(names[0])}..{stem(names[-1])}}}.tar"
    return os.path.join(out, inner)


def main(argv=None):
    args = parse_args(argv)
    try:
        shard_records = registry.import_function(registry.SAMPLE_TYPES[args.sample_type].shard_records)
        records = list(shard_records(args))
        if not args.no_shuffle:
            import random
            random.Random(args.seed).shuffle(records)
        sizes = write_shards(records, args.out, args.shard_size, total=len(records), progress=not args.no_progress,
                             load_truncated=args.load_truncated_images)
    except RankDataError as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    print(f"{shard_url(args.out, sizes)} {sum(sizes.values())}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
