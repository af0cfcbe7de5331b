"""A small synthetic object-counting dataset for text-driven ranking (no downloads needed).

Each image holds exactly ``value`` filled shapes of one kind (circle, square or triangle) plus a few
distractor shapes of another kind, so the instruction "Rank the numbers of circle." only makes sense if
the model reads which kind to count.  The CSVs use the official training format of the ranking-aware
adapter: tab separated, columns ``filepath title cname value sample_weights_by_class``.

Run ``python -m open_clip_rank.synthetic.counting OUT_DIR`` to write the default dataset.
"""
import colorsys
import csv
import logging
import math
import os
import zlib
from collections import Counter
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

from ..files.atomic import atomic_write

logger = logging.getLogger(__name__)

SHAPES = ('circle', 'square', 'triangle')
COLUMNS = ('filepath', 'title', 'cname', 'value', 'sample_weights_by_class')
SPLITS = {'train': 1, 'val': 2}
MAX_DISTRACTORS = 3
GAP = 2            # empty pixels between shape boxes, so shapes never touch (even 8-connected)
NOISE = 6          # +- background noise; keeps the background light and far from shape colours
PLACE_TRIES = 100  # rejection-sampling attempts per shape before falling back to a grid

Box = Tuple[int, int, int, int]  # x0, y0, x1, y1 with x1/y1 exclusive


def instruction(kind: str) -> str:
    """The ranking instruction; the category word must appear verbatim (negative sampling swaps it)."""
    return f"Rank the numbers of {kind}."


def shape_size_range(image_size: int, max_shapes: int) -> Tuple[int, int]:
    """(min, max) shape side such that ``max_shapes`` shapes always fit in the fallback grid."""
    cells = max(1, math.ceil(math.sqrt(max(1, max_shapes))))
    largest = image_size // cells - GAP
    smallest = max(4, largest // 2)
    if largest < smallest:
        raise ValueError(f"image_size {image_size} is too small for {max_shapes} shapes; "
                         f"use a larger image_size or a smaller max_count.")
    return smallest, largest


def image_rng(seed: int, kind: str, split: str, count: int, index: int) -> np.random.Generator:
    """One generator per image, so any image can be regenerated alone and order does not matter.

    The kind enters via a CRC (not its position in ``kinds``) so reordering kinds keeps images stable.
    """
    return np.random.default_rng([int(seed), zlib.crc32(kind.encode()), SPLITS[split], int(count), int(index)])


def _hsv255(h: float, s: float, v: float) -> Tuple[int, int, int]:
    return tuple(int(round(c * 255)) for c in colorsys.hsv_to_rgb(h % 1.0, s, v))


def background_color(rng: np.random.Generator) -> Tuple[int, int, int]:
    """Light pastel: every channel >= ~184, so it never collides with the dark, saturated shape colours."""
    return _hsv255(rng.random(), rng.uniform(0.04, 0.2), rng.uniform(0.9, 1.0))


def shape_colors(rng: np.random.Generator) -> Tuple[Tuple[int, int, int], Tuple[int, int, int]]:
    """(target, distractor) colours: saturated and darker than any background, with clearly different hues
    so the two kinds are never the same colour (colour must not be the cue, but must not merge them either)."""
    hue = rng.random()
    target = _hsv255(hue, rng.uniform(0.6, 1.0), rng.uniform(0.25, 0.65))
    distractor = _hsv255(hue + rng.uniform(0.2, 0.8), rng.uniform(0.6, 1.0), rng.uniform(0.25, 0.65))
    return target, distractor


def noisy_background(rng: np.random.Generator, color, image_size: int) -> Image.Image:
    """A flat colour with mild per-pixel noise, so backgrounds are not trivially uniform."""
    noise = rng.integers(-NOISE, NOISE + 1, size=(image_size, image_size, 3))
    pixels = np.clip(np.asarray(color, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels, 'RGB')


def _apart(box: Box, others: Sequence[Box]) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + GAP <= a0 or a1 + GAP <= x0 or y1 + GAP <= b0 or b1 + GAP <= y0
               for a0, b0, a1, b1 in others)


def _sample_boxes(rng, sizes: Sequence[int], image_size: int) -> Optional[List[Box]]:
    """Rejection sampling; None when some shape found no free spot (the caller then uses the grid)."""
    boxes: List[Box] = []
    for size in sizes:
        for _ in range(PLACE_TRIES):
            x, y = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
            box = (x, y, x + size, y + size)
            if _apart(box, boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _grid_boxes(rng, sizes: Sequence[int], image_size: int) -> List[Box]:
    """Fallback that always succeeds: one shape per grid cell, shrunk to fit, jittered inside its cell."""
    cells = max(1, math.ceil(math.sqrt(len(sizes))))
    cell = image_size // cells
    order = rng.permutation(cells * cells)[:len(sizes)]
    boxes = []
    for slot, size in zip(order, sizes):
        size = min(int(size), cell - GAP)
        row, col = divmod(int(slot), cells)
        x = col * cell + int(rng.integers(0, cell - size - GAP + 1))
        y = row * cell + int(rng.integers(0, cell - size - GAP + 1))
        boxes.append((x, y, x + size, y + size))
    return boxes


def place_boxes(rng, sizes: Sequence[int], image_size: int) -> Tuple[List[Box], bool]:
    """Non-overlapping square boxes for ``sizes``; returns (boxes, used_grid)."""
    boxes = _sample_boxes(rng, sizes, image_size)
    if boxes is not None:
        return boxes, False
    return _grid_boxes(rng, sizes, image_size), True


def draw_shape(draw: ImageDraw.ImageDraw, kind: str, box: Box, color) -> None:
    """Filled shape inside ``box`` (PIL coordinates are inclusive, hence the -1)."""
    x0, y0, x1, y1 = box[0], box[1], box[2] - 1, box[3] - 1
    if kind == 'circle':
        draw.ellipse([x0, y0, x1, y1], fill=color)
    elif kind == 'square':
        draw.rectangle([x0, y0, x1, y1], fill=color)
    elif kind == 'triangle':
        draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=color)
    else:
        raise ValueError(f"unknown shape kind {kind!r}; choose from {SHAPES}")


def draw_counting_image(rng: np.random.Generator, kind: str, count: int, image_size: int = 64,
                        distractor_kinds: Sequence[str] = (), max_shapes: Optional[int] = None
                        ) -> Tuple[Image.Image, Dict]:
    """One image with exactly ``count`` shapes of ``kind`` and 0-3 distractors drawn from ``distractor_kinds``.

    ``max_shapes`` fixes the size range for the whole dataset (default: count + 3), so shape size alone
    does not give the count away.  ``info`` records colours and boxes, which the tests use to recount.
    """
    distractor_kinds = [k for k in distractor_kinds if k != kind]
    n_distractors = int(rng.integers(0, MAX_DISTRACTORS + 1)) if distractor_kinds else 0
    smallest, largest = shape_size_range(image_size, max(max_shapes or 0, count + MAX_DISTRACTORS))
    sizes = [int(s) for s in rng.integers(smallest, largest + 1, size=count + n_distractors)]
    background = background_color(rng)
    target, distractor = shape_colors(rng)
    boxes, used_grid = place_boxes(rng, sizes, image_size)
    chosen = [distractor_kinds[int(i)] for i in rng.integers(0, len(distractor_kinds), size=n_distractors)] \
        if n_distractors else []

    image = noisy_background(rng, background, image_size)
    draw = ImageDraw.Draw(image)
    for box in boxes[:count]:
        draw_shape(draw, kind, box, target)
    for other, box in zip(chosen, boxes[count:]):
        draw_shape(draw, other, box, distractor)
    info = {'kind': kind, 'count': count, 'shape_color': target, 'background_color': background,
            'boxes': boxes[:count], 'distractor_kinds': chosen, 'distractor_color': distractor,
            'distractor_boxes': boxes[count:], 'used_grid': used_grid}
    return image, info


def class_weights(rows: Sequence[Dict]) -> List[float]:
    """1 / (rows with the same cname and value), normalised to sum to 1 within each cname.

    This balances the values inside each category, as the adapter's ``sample_weights_by_class`` expects.
    """
    per_class = Counter((r['cname'], r['value']) for r in rows)
    raw = [1.0 / per_class[(r['cname'], r['value'])] for r in rows]
    totals: Dict[str, float] = {}
    for r, w in zip(rows, raw):
        totals[r['cname']] = totals.get(r['cname'], 0.0) + w
    return [w / totals[r['cname']] for r, w in zip(rows, raw)]


def write_rank_csv(path: str, rows: Sequence[Dict]) -> None:
    """Tab-separated, header first, in the column order of the official format."""
    weights = class_weights(rows)
    with atomic_write(path, 'w', newline='') as f:  # an interrupted run never leaves half a CSV
        writer = csv.writer(f, delimiter='\t', lineterminator='\n')
        writer.writerow(COLUMNS)
        for row, weight in zip(rows, weights):
            writer.writerow([row['filepath'], row['title'], row['cname'], row['value'], repr(weight)])


def check_args(kinds, max_count, train_per_count, val_per_count):
    unknown = [k for k in kinds if k not in SHAPES]
    if not kinds or unknown:
        raise ValueError(f"kinds must be a non-empty subset of {SHAPES}, got {tuple(kinds)}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"kinds must be distinct, got {tuple(kinds)}")
    if max_count < 0 or train_per_count < 0 or val_per_count < 0:
        raise ValueError("max_count, train_per_count and val_per_count must be >= 0")


def _distractors_for(kind: str, kinds: Sequence[str]) -> List[str]:
    """Other requested kinds; with a single kind, the other supported shapes, so distractors still exist."""
    others = [k for k in kinds if k != kind]
    return others or [k for k in SHAPES if k != kind]


def _write_split(root, image_dir, split, per_count, kinds, max_count, image_size, seed, metadata):
    rows = []
    for kind in kinds:
        distractors = _distractors_for(kind, kinds)
        for count in range(max_count + 1):
            for index in range(per_count):
                rng = image_rng(seed, kind, split, count, index)
                image, info = draw_counting_image(rng, kind, count, image_size, distractors,
                                                  max_shapes=max_count + MAX_DISTRACTORS)
                path = os.path.join(image_dir, f'{split}_{kind}_{count:02d}_{index:03d}.png')
                image.save(path, compress_level=1)
                rows.append({'filepath': path, 'title': instruction(kind), 'cname': kind, 'value': count})
                if metadata is not None:
                    metadata.append(dict(info, filepath=path, split=split))
    write_rank_csv(os.path.join(root, f'{split}.csv'), rows)
    return len(rows)


def make_counting_dataset(root, kinds=SHAPES, max_count=9, train_per_count=24, val_per_count=8,
                          image_size=64, seed=0, return_metadata=False) -> Dict:
    """Write ``root/images/*.png`` plus ``root/train.csv`` and ``root/val.csv``; deterministic per seed.

    Returns a dict with 'train_csv', 'val_csv', 'root', 'kinds', 'num_train', 'num_val' and, when
    ``return_metadata``, 'metadata': one dict per image (filepath, split, colours, boxes, distractors).
    """
    kinds = tuple(kinds)
    check_args(kinds, max_count, train_per_count, val_per_count)
    shape_size_range(image_size, max_count + MAX_DISTRACTORS)  # fail early with a clear message
    root = os.path.abspath(os.fspath(root))
    image_dir = os.path.join(root, 'images')
    os.makedirs(image_dir, exist_ok=True)
    metadata = [] if return_metadata else None
    common = dict(kinds=kinds, max_count=max_count, image_size=image_size, seed=seed, metadata=metadata)
    num_train = _write_split(root, image_dir, 'train', train_per_count, **common)
    num_val = _write_split(root, image_dir, 'val', val_per_count, **common)
    result = {'train_csv': os.path.join(root, 'train.csv'), 'val_csv': os.path.join(root, 'val.csv'),
              'root': root, 'kinds': kinds, 'num_train': num_train, 'num_val': num_val}
    if return_metadata:
        result['metadata'] = metadata
    logger.info("wrote counting dataset to %s: %d train and %d val images", root, num_train, num_val)
    return result


def main(argv=None) -> None:
    import argparse
    parser = argparse.ArgumentParser(description="Write the synthetic object-counting rank dataset.")
    parser.add_argument('out_dir', help="folder for images/, train.csv and val.csv")
    parser.add_argument('--seed', type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(message)s')
    result = make_counting_dataset(args.out_dir, seed=args.seed)
    print(f"train: {result['train_csv']} ({result['num_train']} images)")
    print(f"val:   {result['val_csv']} ({result['num_val']} images)")


if __name__ == '__main__':
    main()
