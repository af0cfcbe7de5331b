"""Checkpoint integrity: a checksum in every checkpoint a run with the plugin writes, verified on every load.

``torch.load`` checks nothing about the bytes it reads: the zip archive's CRC-32s are not compared, so a
flipped bit inside tensor data loads silently with wrong weights (a model that then scores every image
``nan``, or worse, plausibly). Two checks, one entry point (``verify_file``):

* checkpoints written by runs with the plugin (``add_checksum``, called on the run's ``torch.save``) carry
  ``CHECKSUM_KEY``: a SHA-256 over the whole checkpoint's content (every key; every tensor's dtype, shape and
  bytes; every other value's type and repr), recomputed after a memory-mapped load. Any change to a value or
  a tensor is found; the zip's headers and the CRC-32s of its small records (the pickle, the version) are
  checked too (cheap), so even a flipped bit that would load the same content is reported;
* files without it (official checkpoints, OpenCLIP's own, a ``.bin`` in a Hugging Face repo) are verified as
  far as their format allows: a torch zip archive's per-record CRC-32s (torch writes one per record by
  default), a safetensors header against the file size (the format has no checksum), a legacy pickle file's
  first byte.

Verification reads the file once (SHA-256 runs at about 1.5 GB/s per core, the CRC-32 pass at about
2 GB/s, docs/robustness.md has the measured cost); results are cached per (path, size, mtime), so a start
check and the load that follows verify once.
"""
import hashlib
import logging
import os
import struct
import warnings
import zipfile
from typing import Optional

import torch

_logger = logging.getLogger(__name__)

CHECKSUM_KEY = 'open_clip_rank_checksum'
ALGORITHM = 'sha256'
ZIP_MAGIC = b'PK\x03\x04'
PICKLE_PROTO = b'\x80'  # torch's legacy format starts with a pickled magic number (protocol 2)
_CHUNK = 1 << 24

_verified = {}  # (realpath, size, mtime_ns) -> reason or None


# --- the checksum ------------------------------------------------------------------------------------

def _tensor_bytes(tensor: torch.Tensor):
    t = tensor.detach()
    if t.device.type != 'cpu':
        t = t.cpu()
    t = t.contiguous().reshape(-1)
    try:
        return t.view(torch.uint8).numpy()
    except (RuntimeError, TypeError):  # sparse / quantized: their values' own bytes
        return t.numpy().tobytes()


_SCALARS = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size)


def _feed(digest, value) -> None:
    """Type-tagged, order-preserving walk: equal content gives an equal digest, whatever the process."""
    if isinstance(value, torch.Tensor):
        digest.update(f'T{value.dtype}{tuple(value.shape)};'.encode())
        if value.numel():
            digest.update(_tensor_bytes(value))
    elif isinstance(value, dict):
        digest.update(f'D{len(value)};'.encode())
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(f'L{len(value)};'.encode())
        for item in value:
            _feed(digest, item)
    elif isinstance(value, _SCALARS):
        digest.update(f'S{type(value).__name__}:{value!r};'.encode())
    else:  # other objects: their type only (a repr may hold a memory address)
        digest.update(f'O{type(value).__module__}.{type(value).__qualname__};'.encode())


def checksum_of(checkpoint: dict) -> str:
    digest = hashlib.new(ALGORITHM)
    _feed(digest, {k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY})
    return digest.hexdigest()


def add_checksum(checkpoint):
    """``checkpoint`` with ``CHECKSUM_KEY`` set (a shallow copy; other objects are returned unchanged)."""
    if not isinstance(checkpoint, dict):
        return checkpoint
    return {**{k: v for k, v in checkpoint.items() if k != CHECKSUM_KEY},
            CHECKSUM_KEY: {'algorithm': ALGORITHM, 'digest': checksum_of(checkpoint)}}


def checksum_mismatch(checkpoint) -> Optional[str]:
    """Why a loaded checkpoint's content differs from what was saved, or None (also when it carries no checksum)."""
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get(CHECKSUM_KEY), dict):
        return None
    recorded = checkpoint[CHECKSUM_KEY]
    if recorded.get('algorithm') != ALGORITHM:
        return f"unknown checksum algorithm {recorded.get('algorithm')!r}"
    if checksum_of(checkpoint) != recorded.get('digest'):
        return f'{ALGORITHM} checksum mismatch: the content changed after it was written (a flipped bit, a bad copy)'
    return None


# --- verifying a file --------------------------------------------------------------------------------

def _zip_records(path) -> Optional[str]:
    """The archive's structure: a central directory, a torch ``data.pkl``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as err:
        return f'incomplete zip archive: {err}'
    if not any(n.endswith('data.pkl') for n in names) and not str(path).endswith(('.npz', '.npy')):
        return 'zip archive without a torch data.pkl'
    return None


def _zip_crc_pass(path, tensor_data: bool) -> Optional[str]:
    """Every record's local header against the central directory and its CRC-32: the small records (the pickle,
    the version) always, the tensor records (``*/data/N``) with ``tensor_data``.

    torch writes a CRC-32 per record unless ``torch.serialization.set_crc32_options(False)``; records whose
    CRC field is 0 (none written) cannot be checked and are skipped.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                check_crc = info.CRC != 0 and (tensor_data or '/data/' not in info.filename)
                with archive.open(info) as record:  # reads and checks the local header
                    if not check_crc:
                        continue
                    while record.read(_CHUNK):  # zipfile compares the CRC-32 at the end of the record
                        pass
    except (zipfile.BadZipFile, EOFError, OSError, ValueError, NotImplementedError) as err:
        return f'{type(err).__name__}: {err}'
    return None


def _load_mapped(path):
    """The checkpoint, memory-mapped (tensor bytes are read while the checksum is computed)."""
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        return torch.load(path, map_location='cpu', mmap=True, weights_only=True)


def _verify_torch_zip(path) -> Optional[str]:
    reason = _zip_records(path) or _zip_crc_pass(path, tensor_data=False)
    if reason is not None:
        return reason
    try:
        checkpoint = _load_mapped(path)
    except Exception:  # noqa: BLE001 - e.g. weights_only refusing a class, a TorchScript archive: the format's
        checkpoint = None  # own CRC-32s decide whether the bytes are intact; the real load reports the rest
    if isinstance(checkpoint, dict) and CHECKSUM_KEY in checkpoint:
        return checksum_mismatch(checkpoint)
    return _zip_crc_pass(path, tensor_data=True)


def _verify_safetensors(path, size) -> Optional[str]:
    import json
    with open(path, 'rb') as f:
        head = f.read(8)
        if len(head) < 8:
            return 'incomplete safetensors header'
        (length,) = struct.unpack('<Q', head)
        if 8 + length > size:
            return 'incomplete safetensors header'
        header = json.loads(f.read(length))
    end = max((v['data_offsets'][1] for k, v in header.items() if k != '__metadata__'), default=0)
    if 8 + length + end > size:
        return f'safetensors data cut short ({size} of {8 + length + end} bytes)'
    return None


def _verify_uncached(path) -> Optional[str]:
    size = os.path.getsize(path)
    if size == 0:
        return 'the file is empty'
    with open(path, 'rb') as f:
        head = f.read(8)
    if head[:4] == ZIP_MAGIC:
        return _verify_torch_zip(path)
    if path.endswith('.safetensors'):
        return _verify_safetensors(path, size)
    if path.endswith(('.npz', '.npy')):  # numpy (big_vision) weights: numpy reports its own damage
        return None
    if ZIP_MAGIC.startswith(head[:len(ZIP_MAGIC)]) and len(head) < len(ZIP_MAGIC):
        return f'the file is {size} byte(s) long: a zip archive cut short'
    if head[:1] != PICKLE_PROTO:
        return 'neither a torch zip archive nor a torch pickle (wrong first bytes)'
    return None  # a legacy pickle file: only loading it can tell (files/checkpoints.reading_checkpoint)


def verify_file(path) -> Optional[str]:
    """Why the checkpoint at ``path`` is damaged, or None when it verifies (as far as its format allows).

    Remote paths (``s3://``, ...) are not verified here.
    """
    path = os.fspath(path)
    if '://' in path:
        return None
    try:
        stat = os.stat(path)
        key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
        if key not in _verified:
            _verified[key] = _verify_uncached(path)
        return _verified[key]
    except (OSError, ValueError, KeyError, TypeError, struct.error) as err:
        return f'{type(err).__name__}: {err}'
