#!/usr/bin/env python
"""An adapter training epoch from the frozen-tower feature cache (``--rank-feature-cache``) vs recomputing the towers.

    python scripts/benchmark_feature_cache.py                       # ViT-B-32-adapter, random weights, CPU
    python scripts/benchmark_feature_cache.py --images 64 --batch-size 16 --threads 4

Random weights (no download), synthetic 256 px images (resized to the model's input), ``--lock-image --lock-text``
as the original code (visual.proj, the text token/positional embeddings and ln_final train) with
``--lock-image-eval`` (the locked tower in eval mode in every mode: the cache needs it for towers with stochastic
depth, e.g. convnext_large_d_320), the single-head rank loss, AdamW; data loading in the main process
(``--workers 0``), included in the times. Each epoch is the same rank sampler's epoch. Rows:

* ``towers``: the ordinary path (the image tower every step; the text side once per distinct caption, as every
  path);
* ``cache fill``: the first epoch with an empty cache (the tower runs on both flip views of each new image);
* ``cache``: epochs after every row was cached (all hits: the image tower never runs).
"""
from types import SimpleNamespace
import argparse
import functools
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='ViT-B-32-adapter')
    p.add_argument('--images', type=int, default=32, help='rows of the synthetic rank CSV (two categories)')
    p.add_argument('--batch-size', type=int, default=8)
    p.add_argument('--epochs', type=int, default=5, help='timed epochs per mode, interleaved (median reported)')
    p.add_argument('--threads', type=int, default=2)
    p.add_argument('--strict-tower-lock', action='store_true',
                   help='freeze the towers entirely (the flag of the same name) instead of the original trainable set')
    p.add_argument('--dtype', default='fp16', choices=('fp16', 'bf16', 'fp32'), help='cache storage type')
    p.add_argument('--device', default='cpu', help='cpu or cuda (the model and every batch on it)')
    return p.parse_args(argv)


def write_data(root, n):
    from PIL import Image, ImageDraw
    import numpy as np
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        kind = ('circle', 'square')[i % 2]
        count = int(rng.integers(0, 8))
        image = Image.new('RGB', (256, 256), (235, 235, 235))
        draw = ImageDraw.Draw(image)
        for _ in range(count):
            x, y = (int(v) for v in rng.integers(0, 230, 2))
            (draw.ellipse if kind == 'circle' else draw.rectangle)([x, y, x + 24, y + 24], fill=(200, 40, 40))
        path = os.path.join(root, f'{i}.png')
        image.save(path)
        rows.append(f'{path}\tRank the numbers of {kind}.\t{kind}\t{count}')
    csv = os.path.join(root, 'train.csv')
    with open(csv, 'w') as f:
        f.write('filepath\ttitle\tcname\tvalue\n' + '\n'.join(rows) + '\n')
    return csv


def main(argv=None):
    args = parse_args(argv)
    import torch
    import open_clip
    import open_clip_rank  # noqa: F401  (registers the adapter configs)
    from torch.utils.data import DataLoader
    from open_clip_rank.data import RankBatchSampler, RankDataset, collate_rank_batch, load_rank_table
    from open_clip_rank.data.cached import CachedRankDataset, collate_cached_rank_batch
    from open_clip_rank.data.transforms import rank_transforms
    from open_clip_rank.data.feature_cache import build_cache
    from open_clip_rank.losses.ranking import RankingLoss
    from open_clip_rank.integration.run_state import end_run, start_run

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    root = tempfile.mkdtemp(prefix='featcache-bench-')
    table = load_rank_table(write_data(root, args.images))
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    model, _, preprocess_val = open_clip.create_model_and_transforms(args.model, device=device)
    start_run(SimpleNamespace(strict_tower_lock=args.strict_tower_lock, lock_image_eval=True))
    model.lock_image_tower()
    model.lock_text_tower()
    end_run()
    model.train()  # the adapter (and what trains of the towers) in training mode, the locked image tower in eval
    train_transform, deterministic = rank_transforms(preprocess_val)
    tokenizer = open_clip.get_tokenizer(args.model)
    loss_fn = RankingLoss(head='single', components=['rank', 'regression', 'bce'],
                          weights={'rank': 1.0, 'regression': 0.2, 'bce': 1.0})
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    sampler = RankBatchSampler(table, args.batch_size, negative_ratio=0.2, seed=0)

    def epoch(loader):
        start = time.perf_counter()
        for images, texts in loader:
            out = model(images.to(device), texts.to(device))
            losses = loss_fn(**out, output_dict=True)
            optimizer.zero_grad(set_to_none=True)
            sum(losses.values()).backward()
            optimizer.step()
        sync()
        return time.perf_counter() - start

    # the single-head loss needs no pair head (as the training loader: with_pairs=False)
    towers = DataLoader(RankDataset(table, train_transform, tokenizer), batch_sampler=sampler,
                        collate_fn=functools.partial(collate_rank_batch, with_pairs=False))
    cache_args = argparse.Namespace(model=args.model, force_image_size=None, force_patch_dropout=None,
                                    force_quick_gelu=False, precision='fp32', rank=0,
                                    rank_feature_cache=os.path.join(root, 'cache'), rank_feature_cache_dtype=args.dtype)
    cache = build_cache(cache_args, model, table, deterministic)
    dataset = CachedRankDataset(table, deterministic, tokenizer, cache.header_path)
    collate = functools.partial(collate_cached_rank_batch, cache_path=cache.header_path, with_pairs=False)
    cached = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate)
    every_row = DataLoader(dataset, batch_size=args.batch_size, collate_fn=collate)

    def tower_forward_epoch():
        # the part the cache removes: the frozen tower's forward over the same batches (pixels loaded beforehand)
        batches = [images.to(device) for images, _ in towers]
        sync()
        start = time.perf_counter()
        with torch.no_grad():
            for images in batches:
                model.image_tower_features(images)
        sync()
        return time.perf_counter() - start

    epoch(towers)  # warm-up
    fill = epoch(cached)
    with torch.no_grad():  # cache the rows the first epoch did not draw
        for images, _ in every_row:
            model.encode_image_tokens(images.to(device))
    cache.hits = cache.misses = 0
    tower_times, cache_times = [], []
    for _ in range(args.epochs):  # interleaved, so load from other processes hits every mode alike
        tower_times.append(epoch(towers))
        cache_times.append(epoch(cached))
    assert cache.misses == 0, 'every row was cached: the warm epochs must not run the tower'
    t_tower = statistics.median(tower_forward_epoch() for _ in range(args.epochs))

    steps = len(sampler)
    t_towers, t_cache = statistics.median(tower_times), statistics.median(cache_times)
    image_size = getattr(model.visual, 'image_size', '?')
    image_size = image_size[0] if isinstance(image_size, (tuple, list)) else image_size
    where = torch.cuda.get_device_name() if device.type == 'cuda' else f'CPU, {args.threads} threads'
    print(f"\n{args.model} (random weights, {image_size} px), {args.images} images, {steps} steps of {args.batch_size}, "
          f"{where}, torch {torch.__version__}, "
          f"{'--strict-tower-lock' if args.strict_tower_lock else 'the original trainable set'}, cache {args.dtype} "
          f"({os.path.getsize(cache.tokens_path) / 2 ** 20:.1f} MiB)\n")
    print(f"| {'mode':<12} | {'epoch s':>8} | {'epochs/s':>8} | {'speed-up':>8} |")
    print(f"|{'-' * 14}|{'-' * 10}|{'-' * 10}|{'-' * 10}|")
    for name, t in (('towers', t_towers), ('cache fill', fill), ('cache', t_cache)):
        print(f"| {name:<12} | {t:>8.2f} | {1 / t:>8.3f} | {t_towers / t:>7.1f}x |")
    print(f"\nThe frozen image tower's forward alone: {t_tower:.2f} s per epoch ({t_tower / t_towers:.0%} of the ordinary "
          f"epoch); the rest (data, text side, adapter forward and backward, optimizer) is what a cached epoch keeps.")


if __name__ == '__main__':
    main()
