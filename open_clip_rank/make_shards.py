"""Convert a sample type's training data (e.g. a rank CSV) into webdataset shards for ``--dataset-type webdataset``.

    python -m open_clip_rank.make_shards rank.csv out/ --shard-size 1000 [--sample-type rank]

Reads the data with the same validation as training (the sample type's ``shard_records``: the same bad rows
are refused, one line each), writes ``out/000000.tar ...`` (each written to a temporary name and
renamed when complete) with ``<key>.<image ext>`` + ``<key>.json`` per row and OpenCLIP's ``sizes.json``,
and prints as its last line the brace-expanded URL for ``--train-data`` and the sample count for
``--train-num-samples``, e.g. ``out/{000000..000004}.tar 1000``.
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
from .files.images import SHARD_IMAGE_KEYS

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
    p.add_argument('--image-root', default=None, help='folder relative image paths resolve against (where the '
                                                       'sample type supports it)')
    p.add_argument('--seed', type=int, default=0, help='rows are shuffled with this seed so that shards mix '
                                                    'categories (streamed buckets fill evenly)')
    p.add_argument('--no-shuffle', action='store_true', help='keep the CSV row order')
    p.add_argument('--no-progress', action='store_true')
    for hook in registry.all_hooks('add_shard_args'):  # the sample types' own flags
        registry.import_function(hook)(p)
    args = p.parse_args(argv)
    if args.shard_size < 1:
        p.error(f"--shard-size must be >= 1, got {args.shard_size}.")
    return args


def _image(path):
    """(extension, bytes): the file as it is for jpg/png/webp, else re-encoded as png."""
    ext = KEEP_EXTENSIONS.get(os.path.splitext(path)[1].lower())
    with open(path, 'rb') as f:
        data = f.read()
    if ext is not None:
        return ext, data
    from PIL import Image
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.convert('RGB').save(buffer, format='PNG')
    return 'png', buffer.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
    tar.addfile(info, io.BytesIO(data))


def _readable_samples(records, bar, skipped):
    """(extension, bytes, json) per record whose image reads; an unreadable one is left out, warned and counted
    (``skipped[0]``)."""
    for path, meta in records:
        bar.update(1)
        try:
            ext, data = _image(path)
        except (OSError, ValueError) as err:  # PIL's UnidentifiedImageError is an OSError
            skipped[0] += 1
            _logger.warning(f"skipped unreadable image {path} ({type(err).__name__}: {err}); "
                            f"{skipped[0]} skipped so far")
            continue
        yield ext, data, meta


def write_shards(records, out, shard_size, total=None, progress=True):
    """Write shards atomically (each through ``files/atomic.py``); returns {shard name: sample count}.

    An image that cannot be re-encoded (a format kept as bytes is checked when training reads it) is left
    out with a warning and counted, as training skips and counts unreadable images."""
    from tqdm import tqdm
    os.makedirs(out, exist_ok=True)
    sizes, skipped, written = {}, [0], 0
    with tqdm(total=total, unit='img', desc='make_shards', disable=not progress, file=sys.stderr) as bar:
        samples = _readable_samples(records, bar, skipped)
        for first in samples:  # a shard holds the next shard_size readable samples
            name = f"{written // shard_size:06d}.tar"
            with atomic_path(os.path.join(out, name)) as tmp, tarfile.open(tmp, 'w') as tar:
                for ext, data, meta in itertools.chain([first], itertools.islice(samples, shard_size - 1)):
                    key = f"{written:09d}"
                    _add(tar, f"{key}.{ext}", data)
                    _add(tar, f"{key}.json", json.dumps(meta).encode())
                    written += 1
            sizes[name] = written - sum(sizes.values())
    if skipped[0]:
        _logger.warning(f"{skipped[0]} unreadable image(s) left out of the shards")
    if not sizes:
        raise RankDataError(f"no readable image among {skipped[0]} row(s): nothing to write to {out}.")
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
        sizes = write_shards(records, args.out, args.shard_size, total=len(records), progress=not args.no_progress)
    except RankDataError as err:
        print(f"make_shards: error: {err}", file=sys.stderr)
        return 2
    print(f"{shard_url(args.out, sizes)} {sum(sizes.values())}")
    return 0


if __name__ == '__main__':
    sys.exit(main())
