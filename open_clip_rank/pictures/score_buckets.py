"""A picture to decide where to cut a score folder: per prompt, a histogram of the scores (bucket edges in blue,
the cut in red when a rule is given) and one row per score bucket (deciles by default, best first) with a few
sample thumbnails and the bucket's score range, as LAION inspected its aesthetic scores. Pillow only; written
atomically."""
from typing import Dict, List, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..files.atomic import atomic_path
from ..files.images import open_rgb

THUMB = 80
PAD = 6
LABEL_WIDTH = 150
HEADER = 24
HIST_HEIGHT = 120
HIST_AXIS = 34
HIST_BINS = 50
MIN_WIDTH = 640
BACKGROUND = (255, 255, 255)
BAR, EDGE, CUT, TEXT = (110, 110, 110), (40, 90, 200), (200, 30, 30), (20, 20, 20)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: no size
        return ImageFont.load_default()


def picture_size(sections: Sequence[dict], per_bucket: int, thumb: int = THUMB):
    """(width, height) of the picture: per section a header, the histogram, one row per bucket."""
    width = max(MIN_WIDTH, LABEL_WIDTH + PAD + per_bucket * (thumb + PAD))
    height = PAD + sum(HEADER + HIST_HEIGHT + HIST_AXIS + len(s['buckets']) * (thumb + PAD) for s in sections)
    return width, height


def _thumbnail(source, thumb):
    """The image (``open_rgb``), or a crossed grey square when it is missing or does not decode."""
    try:
        if source is None:
            raise OSError('no image')
        image = open_rgb(source)
        image.thumbnail((thumb, thumb))
        return image
    except Exception:  # noqa: BLE001 - a picture never fails on one image
        placeholder = Image.new('RGB', (thumb, thumb), (200, 200, 200))
        ImageDraw.Draw(placeholder).line([(0, 0), (thumb, thumb)], fill=(150, 0, 0), width=2)
        return placeholder


def _histogram(draw, box, scores: np.ndarray, edges: Sequence[float], cut: Optional[float], font):
    """Bars of ``scores`` in ``box`` (x0, y0, x1, y1), vertical lines at ``edges`` (blue) and ``cut`` (red)."""
    x0, y0, x1, y1 = box
    draw.rectangle([x0, y0, x1, y1], outline=TEXT)
    if len(scores) == 0:
        draw.text((x0 + 8, y0 + 8), 'no scores', fill=TEXT, font=font)
        return
    lo, hi = float(scores.min()), float(scores.max())
    span = hi - lo if hi > lo else 1.0
    counts, _ = np.histogram(scores, bins=HIST_BINS, range=(lo, lo + span))
    peak = max(int(counts.max()), 1)
    bar = (x1 - x0) / HIST_BINS
    for i, c in enumerate(counts):
        if c:
            top = y1 - (y1 - y0 - 4) * c / peak
            draw.rectangle([x0 + i * bar + 1, top, x0 + (i + 1) * bar - 1, y1], fill=BAR)

    def x_of(value):
        return x0 + (x1 - x0) * (value - lo) / span

    for edge in edges:
        draw.line([(x_of(edge), y0), (x_of(edge), y1)], fill=EDGE, width=1)
    if cut is not None and lo <= cut <= lo + span:
        draw.line([(x_of(cut), y0), (x_of(cut), y1)], fill=CUT, width=2)
    draw.text((x0, y1 + 3), f'{lo:.4g}', fill=TEXT, font=font)
    right = f'{hi:.4g}'
    draw.text((x1 - draw.textlength(right, font=font), y1 + 3), right, fill=TEXT, font=font)
    middle = f'{len(scores)} scores; tallest bar {peak}' + ('; cut (red) ' + f'{cut:.4g}' if cut is not None else '')
    draw.text(((x0 + x1 - draw.textlength(middle, font=font)) / 2, y1 + 3), middle, fill=TEXT, font=font)


def make_score_buckets(sections: List[dict], path, per_bucket: int = 5, thumb: int = THUMB,
                       cuts: Optional[Dict] = None, column: str = 'score') -> dict:
    """Draw ``curation.score_buckets`` sections (each sample row with its ``image``: a path, bytes or None) as
    one PNG at ``path`` (atomically). ``cuts``: prompt -> the cut value to mark. Returns ``{'size': (w, h),
    'sections': [{'prompt', 'buckets'}]}``."""
    size = picture_size(sections, per_bucket, thumb)
    canvas = Image.new('RGB', size, BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    title_font, font = _font(13), _font(11)
    y = PAD
    for section in sections:
        buckets = section['buckets']
        prompt = section['prompt']
        unscored = section['rows'] - len(section['scores'])
        title = f"{prompt if prompt is not None else '(no prompt)'}: {len(section['scores'])} rows by {column}" \
                + (f" ({unscored} without a number)" if unscored else '') \
                + f"; {len(buckets)} equal-count buckets, best first"
        draw.text((PAD, y + 5), title, fill=TEXT, font=title_font)
        y += HEADER
        edges = [b['low'] for b in buckets[:-1]] if len(buckets) > 1 else []
        cut = (cuts or {}).get(prompt)
        _histogram(draw, (PAD + 30, y, size[0] - PAD - 30, y + HIST_HEIGHT), section['scores'], edges, cut, font)
        y += HIST_HEIGHT + HIST_AXIS
        for b, bucket in enumerate(buckets):
            share = 100 / len(buckets)
            lines = [f'{b * share:.0f}-{(b + 1) * share:.0f}% ({bucket["count"]} rows)',
                     f'{bucket["low"]:.4g} .. {bucket["high"]:.4g}']
            for k, line in enumerate(lines):
                draw.text((PAD, y + 4 + 15 * k), line, fill=TEXT, font=font)
            for k, row in enumerate(bucket['samples'][:per_bucket]):
                x = LABEL_WIDTH + PAD + k * (thumb + PAD)
                image = _thumbnail(row.get('image'), thumb)
                canvas.paste(image, (x + (thumb - image.width) // 2, y + (thumb - image.height) // 2))
                label = f"{row['score']:.3g}"
                draw.text((x + 2, y + thumb - 13), label, fill=(255, 255, 0), font=font, stroke_width=1,
                          stroke_fill=(0, 0, 0))
            y += thumb + PAD
    with atomic_path(path) as tmp:
        canvas.save(tmp, format='PNG')
    return {'size': size, 'sections': [{'prompt': s['prompt'], 'buckets': len(s['buckets'])} for s in sections]}

