"""A picture of ranked images: per prompt, thumbnails in rank order with their scores (and targets)."""
import math
from typing import Dict, List

from PIL import Image, ImageDraw, ImageFont

from ..files.atomic import atomic_write
from ..files.images import open_rgb

THUMB = 96
PAD = 6
LABEL = 15
TITLE_SIZE = 13  # Pillow's default FreeType font runs words together below ~12 px ("numbersofcircle")
LABEL_SIZE = 12
HEADER = 22
COLUMNS = 10
BACKGROUND = (255, 255, 255)


def pick_evenly(items: List, limit: int) -> List:
    """At most ``limit`` items spread over the whole ranking, first and last included."""
    if len(items) <= limit:
        return list(items)
    if limit == 1:
        return [items[0]]
    step = (len(items) - 1) / (limit - 1)
    return [items[round(i * step)] for i in range(limit)]


def sheet_size(counts: List[int], columns: int = COLUMNS, thumb: int = THUMB):
    """(width, height) of a sheet with ``counts[k]`` thumbnails in section k."""
    width = PAD + columns * (thumb + PAD)
    height = PAD + sum(HEADER + math.ceil(n / columns) * (thumb + LABEL + PAD) for n in counts)
    return width, height


def _thumbnail(path, thumb):
    """The image as ranked (``open_rgb``: oriented, 8-bit RGB), or a crossed grey square when it does not read."""
    try:
        image = open_rgb(path)
        image.thumbnail((thumb, thumb))
        return image
    except Exception:
        placeholder = Image.new('RGB', (thumb, thumb), (200, 200, 200))
        ImageDraw.Draw(placeholder).line([(0, 0), (thumb, thumb)], fill=(150, 0, 0), width=2)
        return placeholder


def _font(size):
    """Pillow's bundled font at ``size`` (Pillow >= 10.1); the bitmap default where that is unavailable."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # older Pillow: load_default() takes no size
        return ImageFont.load_default()


def _label(row, rank_key, score_key):
    text = f"#{row[rank_key]}: {row[score_key]:.2f}"
    target = row.get('target')
    if target is not None:
        text += f"  t={float(target):g}"
    return text


def make_contact_sheet(rows: List[Dict], path, max_images: int = 40, columns: int = COLUMNS, thumb: int = THUMB,
                       rank_key: str = 'rank', score_key: str = 'score'):
    """Rows need image, prompt, score and rank (a ``target``, when known, is shown beside the score);
    writes a PNG (atomically) and returns its (width, height)."""
    sections = {}
    for row in rows:
        sections.setdefault(row['prompt'], []).append(row)
    chosen = {p: pick_evenly(sorted(rs, key=lambda r: r[rank_key]), max_images) for p, rs in sections.items()}
    size = sheet_size([len(c) for c in chosen.values()], columns, thumb)
    sheet = Image.new('RGB', size, BACKGROUND)
    draw = ImageDraw.Draw(sheet)
    title_font, label_font = _font(TITLE_SIZE), _font(LABEL_SIZE)
    y = PAD
    for prompt, members in chosen.items():
        draw.text((PAD, y + 4), f'{prompt}  ({len(sections[prompt])} images, best first)', fill=(0, 0, 0),
                  font=title_font)
        y += HEADER
        for k, row in enumerate(members):
            col, line = k % columns, k // columns
            x0, y0 = PAD + col * (thumb + PAD), y + line * (thumb + LABEL + PAD)
            image = _thumbnail(row['image'], thumb)
            sheet.paste(image, (x0 + (thumb - image.width) // 2, y0 + (thumb - image.height) // 2))
            label = _label(row, rank_key, score_key)
            font = label_font if draw.textlength(label, font=label_font) <= thumb + PAD else _font(LABEL_SIZE - 2)
            draw.text((x0, y0 + thumb + 1), label, fill=(40, 40, 40), font=font)
        y += math.ceil(len(members) / columns) * (thumb + LABEL + PAD)
    with atomic_write(path, 'wb') as f:
        sheet.save(f, format='PNG')
    return size
