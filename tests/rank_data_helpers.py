"""Tiny on-disk rank datasets for tests (images drawn with PIL, no downloads)."""
import os

import numpy as np
from PIL import Image, ImageDraw


def write_rank_csv(root, kinds=('circle', 'square'), counts=range(6), per_count=2, size=32, seed=0,
                   name='data.csv', weights=False, sep='\t'):
    """Images with ``count`` shapes of ``kind``; returns the CSV path."""
    rng = np.random.default_rng(seed)
    image_dir = os.path.join(root, 'images')
    os.makedirs(image_dir, exist_ok=True)
    rows = []
    for kind in kinds:
        for count in counts:
            for k in range(per_count):
                image = Image.new('RGB', (size, size), (235, 235, 235))
                draw = ImageDraw.Draw(image)
                for _ in range(count):
                    x, y = rng.integers(0, size - 6, 2)
                    shape = draw.ellipse if kind == 'circle' else draw.rectangle
                    shape([int(x), int(y), int(x) + 5, int(y) + 5], fill=(200, 40, 40))
                path = os.path.join(image_dir, f'{name}_{kind}_{count}_{k}.png')
                image.save(path)
                rows.append([path, f'Rank the numbers of {kind}.', kind, str(count)])
    header = ['filepath', 'title', 'cname', 'value']
    if weights:
        header.append('sample_weights_by_class')
        for row in rows:
            row.append(str(1.0 + float(row[3])))
    path = os.path.join(root, name)
    with open(path, 'w') as f:
        f.write(sep.join(header) + '\n')
        for row in rows:
            f.write(sep.join(row) + '\n')
    return path


def make_unreadable_image(path) -> str:
    """A file named like an image that PIL cannot open, to test that loaders skip bad images."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(b'\x00this is not an image\xff' * 16)
    return path
