"""Frozen-tower feature cache (``--rank-feature-cache DIR``): adapter training reads the frozen image tower's
outputs from a memory-mapped file instead of running the tower every epoch.

What is cached, per (image row, view): the output of the image tower's *frozen part*, i.e. what does not train
under ``--lock-image``:

* ViT: the patch tokens after ``ln_post``, *before* ``visual.proj`` (which trains under the default lock, as the
  original code; the model applies it, so gradients reach it; under ``--strict-tower-lock`` the same is cached);
* ModifiedResNet: the layer-4 map, before the model's trainable ``visual_proj`` 1x1 conv;
* timm trunks: the trunk's un-pooled output (the whole tower must be frozen).

Views: the rank train transform flips at random. Both views (no flip, horizontal flip) are stored: a miss runs
the tower on both, and each epoch draws the view with the same probability as ``RandomHorizontalFlip`` (p=0.5).
The flip of the normalised tensor equals the tensor of the flipped (resized) image, so the views are exact.

The text side is always computed (one instruction per batch; negatives re-word their captions), once per distinct
caption (``models.towers.encode_distinct_texts``).

Storage, per directory ``DIR/<key hash>/``, per process rank ``r``: ``rank{r}.tokens`` (raw [rows, 2, *shape]
fp16 / bf16 / fp32), ``rank{r}.index`` ([rows, 2] uint32: CRC32 of the entry, state 1 = complete) and
``rank{r}.json`` (the header: the full key, shapes, dtype). An entry is written data first, then its CRC, then
its state; it is used only when its state is 1 and its CRC matches its bytes, so a partial or corrupt entry is
recomputed, never used. A header that is missing, unreadable or does not match the key and file sizes rebuilds
the files (header removed first, written last by an atomic rename).

The key: the model config and name, the flags that change the built tower (``--force-image-size``,
``--force-patch-dropout``, ``--precision``), a hash of the frozen part's weights, the transform, and the data
(the CSV's absolute path, size and mtime, and every row's image path, size and mtime). A change makes a new key
(a new sub-directory); old ones are left for the user to delete.

The data side (``data/cached.py``) yields ``CachedImages`` in place of the pixel batch: cached tower outputs for
hits, both views' pixels for misses, and the entry numbers. The model's ``encode_image_tokens`` takes it, runs
the tower on the misses only (writing them to the cache) and applies the trainable rest. OpenCLIP's loop is
unchanged (``images.to(device, dtype)`` and ``len(images)`` work on the container).
"""
import hashlib
import json
import logging
import os
import uuid
import zlib
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import torch
from torch import nn

from ..files.atomic import atomic_write

_logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
VIEWS = ('no-flip', 'hflip')
DTYPES = {'fp16': (np.float16, torch.float16), 'bf16': (np.uint16, torch.bfloat16), 'fp32': (np.float32, torch.float32)}
_STATE_COMPLETE = 1


class FeatureCacheError(ValueError):
    """The feature cache cannot be used with this model or these flags."""


# --- the batch container --------------------------------------------------------------------------------

@dataclass
class CachedImages:
    """A rank batch's image side when ``--rank-feature-cache`` is on (in place of the [N, C, H, W] pixels).

    ``pixels`` [M, 2, C, H, W]: both views of the M misses; ``tokens`` [K, *shape]: the cached tower outputs of the
    K hits (storage dtype); ``hit`` [N] bool; ``entries`` [N] cache rows; ``views`` [N] 0 (no flip) / 1 (flip);
    ``cache_path``: the cache's header file (the model writes the misses there).
    """
    pixels: torch.Tensor
    tokens: torch.Tensor
    hit: torch.Tensor
    entries: torch.Tensor
    views: torch.Tensor
    cache_path: str

    def __len__(self):
        return int(self.hit.shape[0])

    def to(self, device=None, dtype=None, non_blocking=False, **kwargs):
        """OpenCLIP's ``images.to(device=, dtype=)``: pixels take both, cached tokens only the device (they are
        cast where they are used); the bookkeeping stays on the CPU (it indexes the memory-mapped file)."""
        return CachedImages(self.pixels.to(device=device, dtype=dtype, non_blocking=non_blocking),
                            self.tokens.to(device=device, non_blocking=non_blocking),
                            self.hit, self.entries, self.views, self.cache_path)

    def pin_memory(self):
        return CachedImages(self.pixels.pin_memory(), self.tokens.pin_memory(), self.hit, self.entries,
                            self.views, self.cache_path)


# --- storage -------------------------------------------------------------------------------------------

def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


class FeatureCache:
    """One process rank's memory-mapped cache file (see the module docstring)."""

    def __init__(self, header_path: str, header: dict, writable: bool):
        self.header_path = header_path
        self.header = header
        base = header_path[:-len('.json')]
        self.tokens_path, self.index_path = base + '.tokens', base + '.index'
        self.entry_shape = tuple(header['entry_shape'])
        self.np_dtype, self.torch_dtype = DTYPES[header['dtype']]
        rows = header['num_entries']
        mode = 'r+' if writable else 'r'
        self.tokens = np.memmap(self.tokens_path, dtype=self.np_dtype, mode=mode,
                                shape=(rows, len(VIEWS), *self.entry_shape))
        self.index = np.memmap(self.index_path, dtype=np.uint32, mode=mode, shape=(rows, 2))
        self.hits = self.misses = 0

    def __len__(self):
        return self.header['num_entries']

    # sizes a valid header implies
    @staticmethod
    def _expected_sizes(header) -> tuple:
        per_entry = int(np.prod(header['entry_shape'])) * len(VIEWS) * np.dtype(DTYPES[header['dtype']][0]).itemsize
        return header['num_entries'] * per_entry, header['num_entries'] * 8

    @classmethod
    def open_or_create(cls, directory: str, key: dict, num_entries: int, entry_shape, dtype: str, rank: int):
        """The cache of ``key`` for process ``rank``: reused when its header matches, otherwise (re)built empty."""
        if dtype not in DTYPES:
            raise FeatureCacheError(f"feature cache dtype must be one of {sorted(DTYPES)}, got {dtype!r}.")
        key_hash = hashlib.blake2b(json.dumps(key, sort_keys=True).encode(), digest_size=8).hexdigest()
        folder = os.path.join(directory, key_hash)
        os.makedirs(folder, exist_ok=True)
        header_path = os.path.join(folder, f'rank{rank}.json')
        expected = {'format': FORMAT_VERSION, 'key': key, 'num_entries': int(num_entries),
                    'entry_shape': [int(s) for s in entry_shape], 'dtype': dtype, 'views': list(VIEWS)}
        reason = cls._mismatch(header_path, expected)
        if reason is None:
            cache = cls(header_path, cls._read_header(header_path), writable=True)
            _logger.info(f"Feature cache {folder} (rank {rank}): reusing it, {cache.num_complete()} of "
                         f"{num_entries} entries complete.")
            return cache
        _logger.info(f"Feature cache {folder} (rank {rank}): building it ({reason}).")
        forget_open(header_path)  # this process's mappings of the old files must not be used again
        base = header_path[:-len('.json')]
        _remove(header_path)  # first: a crash below leaves no header, so the next run rebuilds
        tokens_bytes, index_bytes = cls._expected_sizes(expected)
        for path, size in ((base + '.tokens', tokens_bytes), (base + '.index', index_bytes)):
            _remove(path)
            with open(path, 'wb') as f:  # sparse, zero-filled: every entry incomplete (state 0)
                f.truncate(size)
        header = dict(expected, generation=uuid.uuid4().hex)
        with atomic_write(header_path) as f:
            f.write(json.dumps(header, sort_keys=True))
        return cls(header_path, header, writable=True)

    @staticmethod
    def _read_header(path):
        with open(path) as f:
            return json.load(f)

    @classmethod
    def _mismatch(cls, header_path, expected) -> Optional[str]:
        if not os.path.exists(header_path):
            return 'no cache yet'
        try:
            header = cls._read_header(header_path)
        except (OSError, ValueError) as err:
            return f'unreadable header: {type(err).__name__}'
        if not isinstance(header, dict):
            return 'unreadable header'
        for field, value in expected.items():
            if header.get(field) != value:
                return f'header {field} differs'
        base = header_path[:-len('.json')]
        for path, size in zip((base + '.tokens', base + '.index'), cls._expected_sizes(expected)):
            if not os.path.exists(path) or os.path.getsize(path) != size:
                return f'{os.path.basename(path)} missing or of the wrong size (partial)'
        return None

    @classmethod
    def open_existing(cls, header_path: str, writable: bool) -> 'FeatureCache':
        return cls(header_path, cls._read_header(header_path), writable=writable)

    def num_complete(self) -> int:
        return int((np.asarray(self.index[:, 1]) == _STATE_COMPLETE).sum())

    def read(self, entry: int, view: int) -> Optional[torch.Tensor]:
        """The tower output of ``entry``'s ``view`` ([*shape], storage dtype), or None when the entry is not
        complete or its checksum does not match (partial, corrupt): then it must be recomputed."""
        crc, state = (int(v) for v in self.index[entry])
        if state != _STATE_COMPLETE:
            return None
        data = np.array(self.tokens[entry])  # a copy: both views, checked together
        if zlib.crc32(data.tobytes()) != crc:
            return None
        return torch.from_numpy(data[view]).view(self.torch_dtype)

    def write(self, entry: int, views: torch.Tensor) -> None:
        """Store both views ([2, *shape]) of ``entry``: state cleared, data, checksum, then state (last)."""
        data = views.detach().to('cpu', self.torch_dtype).contiguous()
        if self.header['dtype'] == 'bf16':
            data = data.view(torch.int16)
        data = data.numpy().view(self.np_dtype)
        self.index[entry, 1] = 0
        self.tokens[entry] = data
        self.index[entry, 0] = zlib.crc32(np.ascontiguousarray(data).tobytes())
        self.index[entry, 1] = _STATE_COMPLETE

    def flush(self):
        self.tokens.flush()
        self.index.flush()


_OPEN = {}  # (pid, header path, writable) -> FeatureCache: one mapping per process


def open_cache(header_path: str, writable: bool) -> FeatureCache:
    key = (os.getpid(), header_path, writable)
    if key not in _OPEN:
        _OPEN[key] = FeatureCache.open_existing(header_path, writable)
    return _OPEN[key]


def forget_open(header_path: str) -> None:
    for key in [k for k in _OPEN if k[1] == header_path]:
        del _OPEN[key]


def register_open(cache: FeatureCache) -> None:
    _OPEN[(os.getpid(), cache.header_path, True)] = cache


def log_epoch_usage(epoch: int) -> None:
    """After a training epoch (OpenCLIP's 0-based number): one line per cache this process fills, saying how many
    images came from the cache and how many ran the tower; the counters then restart."""
    for (pid, path, writable), cache in _OPEN.items():
        seen = cache.hits + cache.misses
        if pid != os.getpid() or not writable or not seen:
            continue
        _logger.info(f"Feature cache, epoch {epoch}: {cache.hits} of {seen} images from the cache "
                     f"({cache.hits / seen:.0%}), {cache.misses} through the tower; {cache.num_complete()} of "
                     f"{len(cache)} rows stored ({os.path.dirname(path)}).")
        cache.hits = cache.misses = 0


# --- the model side ------------------------------------------------------------------------------------

def tower_features_from_batch(visual: nn.Module, batch: CachedImages, tower_fn) -> torch.Tensor:
    """[N, *shape] frozen-tower outputs of a ``CachedImages`` batch: hits from the cache, misses computed by
    ``tower_fn`` (both views, no gradient: the cached part is frozen) and written to the cache."""
    hit = batch.hit.bool().cpu()
    param = next(visual.parameters())
    device, dtype = (batch.pixels.device if batch.pixels.numel() else batch.tokens.device), param.dtype
    n = hit.shape[0]
    miss_pos = torch.nonzero(~hit).flatten()
    hit_pos = torch.nonzero(hit).flatten()
    fresh = None
    if len(miss_pos):
        pixels = batch.pixels
        with torch.no_grad():
            both = tower_fn(pixels.flatten(0, 1)).unflatten(0, (pixels.shape[0], len(VIEWS)))
        cache = open_cache(batch.cache_path, writable=True)
        for pos, views in zip(miss_pos.tolist(), both):
            cache.write(int(batch.entries[pos]), views)
        cache.misses += len(miss_pos)
        chosen = batch.views[miss_pos].to(both.device)
        fresh = both[torch.arange(len(miss_pos), device=both.device), chosen]
        dtype = fresh.dtype
    shape = fresh.shape[1:] if fresh is not None else batch.tokens.shape[1:]
    out = torch.empty((n, *shape), dtype=dtype, device=device)
    if fresh is not None:
        out[miss_pos.to(device)] = fresh
    if len(hit_pos):
        out[hit_pos.to(device)] = batch.tokens.to(device=device, dtype=dtype)
        if batch.cache_path:
            open_cache(batch.cache_path, writable=True).hits += len(hit_pos)
    return out


# --- what may be cached ---------------------------------------------------------------------------------

def check_cacheable(model) -> None:
    """Refuse, with the reason, a model whose image-tower outputs cannot be cached: a cached part that trains or
    depends on the batch or on chance in training (BatchNorm with batch statistics, dropout, patch dropout,
    stochastic depth), unless ``--lock-image-eval`` runs the tower as at evaluation."""
    if not hasattr(model, 'image_tower_features'):
        raise FeatureCacheError(f"--rank-feature-cache caches adapter models' image towers; "
                                f"{type(model).__name__} is not one.")
    trainable_after = set(model.image_tower_trainable_after_cache())
    training = [name for name, p in model.visual.named_parameters() if p.requires_grad and name not in trainable_after]
    if training:
        raise FeatureCacheError(
            f"--rank-feature-cache needs a frozen image tower, but {len(training)} of its parameters train "
            f"(e.g. visual.{training[0]}): use --lock-image without --lock-image-unlocked-groups.")
    if getattr(model, 'image_tower_eval', False):
        return  # --lock-image-eval: no module of the tower behaves differently from evaluation
    for name, module in model.visual.named_modules():
        random_in_training_ = random_in_training(module)
        if random_in_training_:
            why, fix = random_in_training_
            raise FeatureCacheError(f"--rank-feature-cache: visual.{name} {why}, so a cached output would differ "
                                    f"from the tower's; add {fix}--lock-image-eval (the locked tower then runs in "
                                    f"eval mode, cached or not).")


def random_in_training(module: nn.Module) -> Optional[Tuple[str, str]]:
    """(why ``module`` makes a frozen module's output depend on the batch or on chance in training mode, a fix of
    its own besides --lock-image-eval), or None. The one rule for every cache of frozen outputs (this cache, the
    adapter's frozen-text memo)."""
    from torch.nn.modules.batchnorm import _BatchNorm
    from torch.nn.modules.dropout import _DropoutNd
    from open_clip.transformer import PatchDropout
    if isinstance(module, _BatchNorm):
        return "is a BatchNorm that uses batch statistics in training", '--lock-image-freeze-bn-stats or '
    if isinstance(module, _DropoutNd) and module.p > 0:
        return f"drops at random in training (p={module.p})", ''
    if isinstance(module, nn.MultiheadAttention) and module.dropout > 0:
        return f"drops attention weights at random in training (dropout={module.dropout})", ''
    if isinstance(module, PatchDropout) and module.prob > 0:
        return f"drops patches at random in training (prob={module.prob})", ''
    drop_prob = getattr(module, 'drop_prob', 0)  # timm's DropPath / DropBlock
    if isinstance(drop_prob, (int, float)) and drop_prob > 0:
        return f"drops residual branches at random in training ({type(module).__name__}, drop_prob={drop_prob})", ''
    return None


def tower_weights_hash(model) -> str:
    """Identity of the cached part's weights (and buffers): BLAKE2b over names, dtypes, shapes and bytes."""
    skip = set(model.image_tower_trainable_after_cache())
    digest = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.visual.state_dict().items()):
        if name in skip:
            continue
        t = tensor.detach().cpu().contiguous()
        digest.update(f'{name}|{t.dtype}|{tuple(t.shape)}|'.encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def data_key(table) -> dict:
    """The CSV (absolute path, size, mtime) and every row's image (path, size, mtime)."""
    source = os.path.abspath(table.source)
    digest = hashlib.blake2b(digest_size=16)
    for path in table.paths:
        try:
            st = os.stat(path)
            stamp = f'{st.st_size}:{st.st_mtime_ns}'
        except OSError:
            stamp = 'unreadable'
        digest.update(f'{os.path.abspath(path)}|{stamp}\n'.encode())
    info = {'csv': source, 'rows': len(table.paths), 'images': digest.hexdigest()}
    if os.path.exists(source):
        st = os.stat(source)
        info.update(csv_size=st.st_size, csv_mtime_ns=st.st_mtime_ns)
    return info


def build_cache(args, model, table, transform) -> FeatureCache:
    """The training process's cache for ``table`` under ``transform`` (the deterministic, no-flip transform)."""
    from PIL import Image

    from ..files.images import DECODER_VERSION
    from ..integration.compat import read_model_config
    check_cacheable(model)
    probe = transform(Image.new('RGB', (64, 64)))
    param = next(model.visual.parameters())
    with torch.no_grad():
        entry_shape = tuple(model.image_tower_features(probe[None].to(param.device, param.dtype)).shape[1:])
    key = {
        'format': FORMAT_VERSION,
        'model': args.model,
        'model_config': read_model_config(args.model),
        'model_flags': {f: str(getattr(args, f, None)) for f in ('force_image_size', 'force_patch_dropout',
                                                                  'force_quick_gelu', 'precision')},
        'tower_dtype': str(param.dtype),
        'tower_weights': tower_weights_hash(model),
        'transform': repr(transform),
        'image_decoding': [DECODER_VERSION, bool(getattr(args, 'load_truncated_images', False))],
        'views': list(VIEWS),
        'data': data_key(table),
    }
    cache = FeatureCache.open_or_create(args.rank_feature_cache, key, len(table), entry_shape,
                                        args.rank_feature_cache_dtype, getattr(args, 'rank', 0))
    register_open(cache)
    return cache
