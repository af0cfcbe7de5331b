"""Image files: which suffixes are images, finding them in a folder, and what a webdataset shard holds."""
from pathlib import Path

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')  # files read as images
SHARD_IMAGE_KEYS = ('jpg', 'jpeg', 'png', 'webp')  # a shard sample's image entry; make_shards re-encodes others


def is_image_file(path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def find_images(folder, flag: str = '--images'):
    """Every image file under ``folder`` (recursively), sorted; one clear error when there is none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {folder} is not a folder.")
    images = sorted(str(p) for p in folder.rglob('*') if is_image_file(p))
    if not images:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder}.")
    return images
