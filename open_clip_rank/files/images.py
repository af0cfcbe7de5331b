"""Image files: which suffixes are images, finding them in a folder, what a webdataset shard holds, and
``open_rgb``, the one function of the package that decodes an image.

``open_rgb`` turns a path, bytes, a file object or a PIL image into a fully loaded 8-bit RGB image (file
closed), the same way for training (CSV and shards), the rank CLI and Python API, ``make_shards``, contact
sheets and the synthetic sets:

* EXIF orientation is applied (``ImageOps.exif_transpose``; a damaged EXIF block leaves the pixels as stored);
* 16-bit greyscale (``I;16``, ``I;16B``, ``I;16L``, ``I;16N``: 16-bit PNG and TIFF) maps v to round(v / 257);
  32-bit integer ``I`` likewise when its values lie in [0, 65535] (16-bit PNGs under older Pillow), else its
  range min..max onto 0..255; float ``F`` by its range: [0, 1] times 255, [0, 255] as is, [0, 65535] / 257,
  else min..max onto 0..255 (NaN as the minimum, infinities as the extremes). ``convert('RGB')`` would clip
  them (a 16-bit image turns white);
* transparency (``RGBA``, ``LA``, ``PA``, premultiplied modes, a palette or colour key with ``transparency``) is
  composited on white (``BACKGROUND``), not dropped: the colour under fully transparent pixels is arbitrary;
* everything else (``CMYK``, ``YCbCr``, ``P``, ``1``, ``L``) is Pillow's ``convert('RGB')``;
* a decompression bomb (more than ``PIL.Image.MAX_IMAGE_PIXELS`` pixels: Pillow's warning and error alike) and
  a truncated file are unreadable; ``load_truncated=True`` (or ``with truncated_images():``) decodes what a
  truncated file holds, as ``ImageFile.LOAD_TRUNCATED_IMAGES`` does.

Whatever does not decode raises ``OSError`` (Pillow's own, or ``UnreadableImageError`` wrapping anything else
Pillow raises), so callers skip and count unreadable images by catching ``OSError``.
"""
import contextlib
import contextvars
import io
import logging
import os
import threading
import warnings
from pathlib import Path

_logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')  # files read as images
SHARD_IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')  # a shard sample's image entry; make_shards re-encodes others


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def find_images(folder, flag: str = '--images'):
    """Every image file under ``folder`` (recursively, symlinked folders followed), sorted; one clear error when
    there is none.

    A folder reached twice (a symlink loop, two links to one folder) is searched once, and a file reached twice
    (through links) is listed once: the first path in sorted order of the walk."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder} is not a folder.")
    images, seen_folders, seen_files = [], set(), set()
    for root, dirs, files in os.walk(str(folder), followlinks=True):
        real = os.path.realpath(root)
        if real in seen_folders:  # a loop, or a folder already searched under another path
            dirs[:] = []
            continue
        seen_folders.add(real)
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            if not is_image_file(path):
                continue
            real_file = os.path.realpath(path)
            if real_file not in seen_files:
                seen_files.add(real_file)
                images.append(path)
    images.sort()
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}.")
    return images


# --- decoding --------------------------------------------------------------------------------------------

DECODER_VERSION = 1  # raised whenever open_rgb decodes some file differently (keys of stored decoded images)
BACKGROUND = (255, 255, 255)  # what transparent pixels are composited on
ALPHA_MODES = ('RGBA', 'LA', 'PA', 'RGBa', 'La')

_load_truncated = contextvars.ContextVar('open_clip_rank_load_truncated', default=False)
_truncated_lock = threading.Lock()  # ImageFile.LOAD_TRUNCATED_IMAGES is one global: one lenient load at a time


class UnreadableImageError(OSError):
    """An image that does not decode for a reason Pillow reports as something other than an ``OSError``
    (a decompression bomb, a broken chunk, an unsupported mode): one exception type for callers to catch."""


@contextlib.contextmanager
def truncated_images(allowed: bool = True):
    """``open_rgb`` calls without ``load_truncated`` in this block (this thread or task) decode truncated files
    (``allowed``) or refuse them (the default outside any block)."""
    token = _load_truncated.set(bool(allowed))
    try:
        yield
    finally:
        _load_truncated.reset(token)


def open_rgb(source, load_truncated=None):
    """``source`` (a path, bytes, a binary file object or a PIL image) as a fully loaded 8-bit RGB PIL image,
    oriented by its EXIF tag; the file is closed before it returns. The module docstring says how each mode
    becomes RGB.

    ``load_truncated``: decode what a truncated file holds instead of refusing it (None: as the enclosing
    ``truncated_images`` block says, else no; Pillow's global ``ImageFile.LOAD_TRUNCATED_IMAGES`` set by the
    program counts too). Raises ``OSError`` (``UnreadableImageError`` for what Pillow reports otherwise) for an
    image that does not decode, a decompression bomb included.
    """
    from PIL import Image
    if load_truncated is None:
        load_truncated = _load_truncated.get()
    try:
        if isinstance(source, Image.Image):
            _load(source, load_truncated)
            return _to_rgb(_oriented(source))
        if isinstance(source, (bytes, bytearray, memoryview)):
            source = io.BytesIO(source)
        with warnings.catch_warnings():
            warnings.simplefilter('error', Image.DecompressionBombWarning)  # over the limit: unreadable
            with Image.open(source) as image:
                _load(image, load_truncated)
                return _to_rgb(_oriented(image))
    except Image.UnidentifiedImageError as err:
        if isinstance(source, (str, os.PathLike)):
            raise
        raise UnreadableImageError(_not_an_image(source)) from err  # not PIL's '<_io.BytesIO object at 0x...>'
    except (OSError, MemoryError):
        raise
    except Exception as err:  # DecompressionBombError/-Warning, SyntaxError, ValueError, struct.error, ...
        raise UnreadableImageError(f"{type(err).__name__}: {err}") from err


def _not_an_image(stream) -> str:
    """What an unidentified in-memory file is: empty, or its size and first bytes."""
    try:
        stream.seek(0)
        head, size = stream.read(16), stream.seek(0, io.SEEK_END)
    except Exception:  # noqa: BLE001 - a stream that cannot tell: say so without details
        return 'cannot identify image file'
    return 'empty file' if not size else f'cannot identify image file ({size} bytes, starting {head!r})'


def _load(image, load_truncated):
    if not load_truncated:
        image.load()
        return
    from PIL import ImageFile
    with _truncated_lock:
        previous = ImageFile.LOAD_TRUNCATED_IMAGES
        ImageFile.LOAD_TRUNCATED_IMAGES = True
        try:
            image.load()
        finally:
            ImageFile.LOAD_TRUNCATED_IMAGES = previous


EXIF_ORIENTATION = 0x0112


def _oriented(image):
    """The image turned as its EXIF orientation says (a new image), or the image itself when it needs no turn or its
    EXIF block is damaged (``_to_rgb`` makes the copy every image gets: no second full-image copy per image)."""
    from PIL import ImageOps
    try:
        if image.getexif().get(EXIF_ORIENTATION, 1) == 1:
            return image
        return ImageOps.exif_transpose(image)
    except Exception as err:  # noqa: BLE001 - a damaged EXIF block must not make readable pixels unreadable
        _logger.debug(f"EXIF orientation ignored ({type(err).__name__}: {err})")
        return image


def _to_rgb(image):
    """Any Pillow mode -> a new 8-bit RGB image (see the module docstring)."""
    from PIL import Image
    mode = image.mode
    if mode.startswith('I') or mode == 'F':
        return _scaled_to_8bit(image).convert('RGB')
    if mode in ALPHA_MODES or 'transparency' in image.info:  # a palette, L or RGB with a transparent colour too
        rgba = image.convert('RGBA')
        background = Image.new('RGBA', rgba.size, BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert('RGB')
    return image.convert('RGB')


def _scaled_to_8bit(image):
    """A 16-bit, 32-bit integer or float greyscale image -> mode 'L', scaled (not clipped) to 8 bits."""
    import numpy as np
    from PIL import Image
    mode = image.mode
    values = np.asarray(image)
    if mode.startswith('I;16') or (mode != 'F' and values.size and values.min() >= 0 and values.max() <= 65535):
        eight = (values.astype(np.uint32) + 128) // 257  # round(v / 257): 0 -> 0, 65535 -> 255, 257k -> k
    else:
        values = values.astype(np.float64)
        finite = np.isfinite(values)
        lo, hi = (float(values[finite].min()), float(values[finite].max())) if finite.any() else (0.0, 0.0)
        values = np.where(finite, values, np.where(values > 0, hi, lo))  # NaN and -inf: the minimum; +inf: the max
        if mode == 'F' and lo >= 0 and hi <= 1:
            eight = values * 255
        elif mode == 'F' and lo >= 0 and hi <= 255:
            eight = values
        elif mode == 'F' and lo >= 0 and hi <= 65535:
            eight = values / 257
        else:
            eight = (values - lo) * (255 / (hi - lo)) if hi > lo else np.zeros_like(values)
        eight = np.rint(eight)
    return Image.fromarray(np.ascontiguousarray(np.clip(eight, 0, 255).astype(np.uint8)))
