"""Heat-map pictures (e.g. prototype similarities, predicted-vs-true ranks) and the confusion heat map.

Drawn with Pillow (already a dependency) so no plotting library is needed: a heat map with labelled
axes, tick labels and a colour bar, written atomically (temporary file, then rename).
"""
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files.atomic import atomic_path

MARGIN_LEFT, MARGIN_TOP, MARGIN_RIGHT, MARGIN_BOTTOM = 70, 40, 90, 60
SIDE = 480  # heat-map side in pixels
BAR_WIDTH = 18


WHITE, DARK_RED = np.array([255, 255, 255]), np.array([103, 0, 13])


def _colours(t):
    """White -> dark red (as the official ``Reds`` pictures) for values t in [0, 1], any shape -> [..., 3] uint8."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)[..., None]
    return (WHITE - (WHITE - DARK_RED) * t).astype(np.uint8)


def _colour(t: float):
    return tuple(int(c) for c in _colours(t))


def _ticks(n: int, count: int = 6):
    return sorted(set(int(round(v)) for v in np.linspace(0, n - 1, min(n, count))))


def _save_atomically(image: Image.Image, path):
    with atomic_path(path) as tmp:
        image.save(tmp, format='PNG')


def heatmap_png(matrix, path, title: str, x_label: str, y_label: str, value_label: str):
    """``matrix`` [rows, cols] as a heat map: rows top to bottom, columns left to right, colour bar at right."""
    matrix = np.asarray(matrix, dtype=np.float64)
    rows, cols = matrix.shape
    lo, hi = float(np.nanmin(matrix)), float(np.nanmax(matrix))
    scaled = (matrix - lo) / (hi - lo) if hi > lo else np.zeros_like(matrix)
    cells = Image.fromarray(_colours(scaled)).resize((SIDE, SIDE), Image.NEAREST)
    canvas = Image.new('RGB', (MARGIN_LEFT + SIDE + MARGIN_RIGHT, MARGIN_TOP + SIDE + MARGIN_BOTTOM), 'white')
    canvas.paste(cells, (MARGIN_LEFT, MARGIN_TOP))
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default()
    draw.rectangle([MARGIN_LEFT - 1, MARGIN_TOP - 1, MARGIN_LEFT + SIDE, MARGIN_TOP + SIDE], outline='black')
    draw.text((MARGIN_LEFT, 12), title, fill='black', font=font)
    for j in _ticks(cols):
        x = MARGIN_LEFT + (j + 0.5) * SIDE / cols
        draw.line([(x, MARGIN_TOP + SIDE), (x, MARGIN_TOP + SIDE + 4)], fill='black')
        draw.text((x - 6, MARGIN_TOP + SIDE + 6), str(j), fill='black', font=font)
    for i in _ticks(rows):
        y = MARGIN_TOP + (i + 0.5) * SIDE / rows
        draw.line([(MARGIN_LEFT - 4, y), (MARGIN_LEFT, y)], fill='black')
        draw.text((MARGIN_LEFT - 30, y - 6), str(i), fill='black', font=font)
    draw.text((MARGIN_LEFT + SIDE // 2 - 40, MARGIN_TOP + SIDE + 28), x_label, fill='black', font=font)
    draw.text((6, MARGIN_TOP + SIDE // 2), y_label, fill='black', font=font)
    # colour bar: hi at the top, lo at the bottom
    bar_x = MARGIN_LEFT + SIDE + 20
    for y in range(SIDE):
        draw.line([(bar_x, MARGIN_TOP + y), (bar_x + BAR_WIDTH, MARGIN_TOP + y)], fill=_colour(1 - y / (SIDE - 1)))
    draw.rectangle([bar_x, MARGIN_TOP, bar_x + BAR_WIDTH, MARGIN_TOP + SIDE], outline='black')
    draw.text((bar_x + BAR_WIDTH + 4, MARGIN_TOP - 4), f'{hi:.3g}', fill='black', font=font)
    draw.text((bar_x + BAR_WIDTH + 4, MARGIN_TOP + SIDE - 8), f'{lo:.3g}', fill='black', font=font)
    draw.text((bar_x - 10, MARGIN_TOP + SIDE + 28), value_label, fill='black', font=font)
    _save_atomically(canvas, path)


def confusion_png(labels: Sequence[int], predictions: Sequence[int], num_ranks: int, path, title='Predicted vs true'):
    """Counts of (true rank, predicted rank): the diagonal is right, distance from it is the error."""
    counts = np.zeros((num_ranks, num_ranks))
    for t, p in zip(np.asarray(labels, dtype=int), np.asarray(predictions, dtype=int)):
        counts[t, p] += 1
    heatmap_png(counts, path, title, 'predicted rank', 'true rank', 'images')
