"""Generated image-caption data for pretraining tests (RankCLIP, plain CLIP): coloured shapes, no downloads.

Each image shows one filled shape (circle, square or triangle) in one of four colours, at a random size and
place on a noisy light background; its caption names both ("a red circle.", "a drawing of a blue
square", ...). The held-out split is labelled with its class (colour x shape: 12 classes, chance 1/12), so
zero-shot classification of a model trained on the captions measures what contrastive pretraining learnt.
The CSVs are OpenCLIP's own CSV format (tab separated, ``filepath`` and ``title`` columns), so
``python -m open_clip_train.main --dataset-type csv --train-data train.csv`` reads them unchanged.

``python -m open_clip_rank.synthetic.captions OUT_DIR`` writes the default dataset.
"""
import csv
import os
import sys
import zlib
from typing import Dict, List, Sequence

import numpy as np
from PIL import ImageDraw

from ..files.atomic import atomic_write
from .counting import SHAPES, draw_shape, noisy_background

COLORS = {'red': (205, 35, 35), 'green': (35, 150, 45), 'blue': (40, 65, 215), 'yellow': (225, 195, 25)}
CAPTION_TEMPLATES = ('a {color} {shape}.', 'a photo of a {color} {shape}.', 'a drawing of a {color} {shape}',
                     'one {color} {shape} on a light background.', '{color} {shape}')
ZERO_SHOT_TEMPLATES = ('a {color} {shape}.', 'a photo of a {color} {shape}.')
SPLITS = {'train': 1, 'val': 2}


def classes() -> List[Dict[str, str]]:
    return [{'color': color, 'shape': shape} for color in COLORS for shape in SHAPES]


def class_name(cls: Dict[str, str]) -> str:
    return f"{cls['color']} {cls['shape']}"


def draw_caption_image(rng: np.random.Generator, color: str, shape: str, image_size: int = 32):
    """One shape of ``color`` (jittered +-25 per channel) and ``shape``, 35-70 % of the image side."""
    background = tuple(int(v) for v in rng.integers(190, 250, size=3))
    image = noisy_background(rng, background, image_size)
    size = int(rng.integers(int(image_size * 0.35), int(image_size * 0.7) + 1))
    x, y = (int(v) for v in rng.integers(0, image_size - size + 1, size=2))
    fill = tuple(int(np.clip(c + rng.integers(-25, 26), 0, 255)) for c in COLORS[color])
    draw_shape(ImageDraw.Draw(image), shape, (x, y, x + size, y + size), fill)
    return image


def make_caption_dataset(root, train_per_class: int = 40, val_per_class: int = 10, image_size: int = 32,
                         seed: int = 0) -> Dict:
    """Write ``root/images/*.png``, ``root/train.csv`` (filepath, title) and ``root/val.csv`` (filepath, title,
    label: the class index into ``classes()``). Deterministic per seed."""
    image_dir = os.path.join(root, 'images')
    os.makedirs(image_dir, exist_ok=True)
    paths = {}
    for split, per_class in (('train', train_per_class), ('val', val_per_class)):
        rows = []
        for label, cls in enumerate(classes()):
            for index in range(per_class):
                rng = np.random.default_rng([seed, SPLITS[split], zlib.crc32(class_name(cls).encode()), index])
                image = draw_caption_image(rng, cls['color'], cls['shape'], image_size)
                path = os.path.join(image_dir, f"{split}_{cls['color']}_{cls['shape']}_{index:03d}.png")
                image.save(path, compress_level=1)
                template = CAPTION_TEMPLATES[int(rng.integers(len(CAPTION_TEMPLATES)))]
                rows.append((path, template.format(**cls), label))
        order = np.random.default_rng([seed, SPLITS[split]]).permutation(len(rows))
        paths[split] = os.path.join(root, f'{split}.csv')
        with atomic_write(paths[split], 'w', newline='') as f:
            writer = csv.writer(f, delimiter='\t', lineterminator='\n')
            writer.writerow(('filepath', 'title', 'label') if split == 'val' else ('filepath', 'title'))
            for i in order:
                writer.writerow(rows[i] if split == 'val' else rows[i][:2])
    return {'train': paths['train'], 'val': paths['val'], 'classes': [class_name(c) for c in classes()]}


def read_labelled(path: str) -> List[tuple]:
    with open(path, newline='') as f:
        return [(row['filepath'], int(row['label'])) for row in csv.DictReader(f, delimiter='\t')]


def zero_shot_accuracy(model, preprocess, tokenizer, val_csv: str,
                       templates: Sequence[str] = ZERO_SHOT_TEMPLATES, batch_size: int = 64) -> float:
    """Top-1 zero-shot accuracy on the labelled held-out split: class prompts (mean of the templates'
    normalised text features) against each image's features."""
    import torch

    from ..files.images import open_rgb
    rows = read_labelled(val_csv)
    model.eval()
    with torch.no_grad():
        prompts = [[t.format(**cls) for t in templates] for cls in classes()]
        text = model.encode_text(tokenizer([p for group in prompts for p in group]), normalize=True)
        text = torch.nn.functional.normalize(text.view(len(prompts), len(templates), -1).mean(1), dim=-1)
        correct = 0
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            images = torch.stack([preprocess(open_rgb(p)) for p, _ in chunk])
            predicted = (model.encode_image(images, normalize=True) @ text.T).argmax(dim=1)
            correct += sum(int(p) == label for p, (_, label) in zip(predicted.tolist(), chunk))
    return correct / len(rows)


if __name__ == '__main__':
    if len(sys.argv) != 2:
        raise SystemExit('usage: python -m open_clip_rank.synthetic.captions OUT_DIR')
    info = make_caption_dataset(sys.argv[1])
    print(f"wrote {info['train']} and {info['val']} ({len(info['classes'])} classes)")
