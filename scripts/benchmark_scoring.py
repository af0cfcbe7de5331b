"""Scoring throughput end to end (JPEG decode and resize included) against the model alone on pre-decoded tensors,
same model, same run. Prints a Markdown table.

    python scripts/benchmark_scoring.py --model ViT-B-32-adapter --images 96 --workers 0 1 2
    python scripts/benchmark_scoring.py --device cuda --precision bf16 --workers 0 4 16 --images 4096

Rows: ``pre-decoded`` (the image tower and the adapter's scoring on tensors already in memory: the ceiling),
``JPEG files`` (a folder through the rank CLI's scoring path, ``scoring/engine.py``, Parquet output included) and
``JPEG shards`` (the same images in webdataset shards), each with ``--workers`` 0, 1, 2 ... DataLoader workers.
Random weights: the cost is the same as a trained model's. The images are generated (``--width`` x ``--height``
JPEGs, as photos come), so no data is downloaded.
"""
import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / 'tests'))  # tiny test configs, when asked for


def make_images(folder, count, width, height, quality=90):
    """Photo-like JPEGs (smooth gradients plus noise, so they compress as photos do)."""
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    paths = []
    base = torch.linspace(0, 255, width).repeat(height, 1)
    for i in range(count):
        noise = torch.randn(height // 8, width // 8).repeat_interleave(8, 0).repeat_interleave(8, 1) * 40
        channels = [(base * (0.3 + 0.2 * c) + noise + 20 * i).clamp(0, 255) for c in range(3)]
        pixels = torch.stack(channels, dim=-1).to(torch.uint8).numpy()
        path = folder / f'{i:06d}.jpg'
        Image.fromarray(pixels).save(path, quality=quality)
        paths.append(str(path))
    return paths


def write_shards(paths, folder, per_shard):
    import webdataset as wds
    folder.mkdir(parents=True, exist_ok=True)
    urls = []
    for start in range(0, len(paths), per_shard):
        url = str(folder / f'{start // per_shard:05d}.tar')
        with wds.TarWriter(url) as writer:
            for path in paths[start:start + per_shard]:
                writer.write({'__key__': Path(path).stem, 'jpg': Path(path).read_bytes()})
        urls.append(url)
    return urls


def _sync(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@torch.inference_mode()
def predecoded_rate(model, transform, tokenizer, paths, prompt, batch_size, device, repeats):
    from open_clip_rank.files.images import open_rgb
    from open_clip_rank.inference import autocast_for, image_dtype
    tensors = torch.stack([transform(open_rgb(p)) for p in paths])
    dtype, autocast = image_dtype(model), autocast_for(model, device, None)
    with autocast:
        state = model.encode_prompts(tokenizer([prompt]).to(device))
    if device.type == 'cuda':
        tensors = tensors.pin_memory()

    def one_pass():
        for start in range(0, len(tensors), batch_size):
            images = tensors[start:start + batch_size].to(device=device, dtype=dtype, non_blocking=True)
            with autocast:
                model.rank_predictions(model.encode_image_tokens(images), state)
        _sync(device)

    one_pass()  # warm-up
    best = float('inf')
    for _ in range(repeats):
        start = time.perf_counter()
        one_pass()
        best = min(best, time.perf_counter() - start)
    return len(tensors) / best


def end_to_end_rate(model, transform, tokenizer, partitions, prompt, batch_size, workers, device, repeats):
    from open_clip_rank.scoring.engine import ScoringPlan, score_to_folder
    times, count = [], 0
    for _ in range(repeats + 1):  # the first run warms up (page cache, allocator); worker start-up counts
        with tempfile.TemporaryDirectory() as out:
            plan = ScoringPlan(partitions, [prompt], {'model': 'benchmark'})
            start = time.perf_counter()
            summary = score_to_folder(model, transform, tokenizer, plan, out, batch_size=batch_size,
                                      workers=workers, device=device)
            _sync(device)
            times.append(time.perf_counter() - start)
        count = summary.rows
    return count / min(times[1:])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--model', default='ViT-B-32-adapter')
    p.add_argument('--images', type=int, default=96, help='Number of generated JPEGs.')
    p.add_argument('--width', type=int, default=1024)
    p.add_argument('--height', type=int, default=768)
    p.add_argument('--batch-size', type=int, default=32)
    p.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--per-shard', type=int, default=32, help='Images per shard (and per folder partition).')
    p.add_argument('--device', default='cpu')
    p.add_argument('--precision', default='fp32')
    p.add_argument('--repeats', type=int, default=1)
    p.add_argument('--folder', default=None, help='Where to write the generated images (default: a temp dir).')
    args = p.parse_args(argv)
    if args.model.startswith('tiny-'):
        os.environ.setdefault('OPEN_CLIP_RANK_MODEL_CONFIGS', str(Path(__file__).resolve().parent.parent / 'tests'
                                                                   / 'model_configs'))
    from open_clip_rank.inference import load_rank_model
    from open_clip_rank.scoring.partitions import chunk_partitions, shard_partitions
    device = torch.device(args.device)
    model, transform, tokenizer = load_rank_model(args.model, device=device, precision=args.precision,
                                                  random_weights=True)
    prompt = 'Rank the numbers of cat.'
    with tempfile.TemporaryDirectory(dir=args.folder) as root:
        paths = make_images(Path(root) / 'images', args.images, args.width, args.height)
        urls = write_shards(paths, Path(root) / 'shards', args.per_shard)
        files = chunk_partitions([{'key': p, 'path': p} for p in paths], 'images', 'files', args.per_shard)
        shards = shard_partitions(urls)
        ceiling = predecoded_rate(model, transform, tokenizer, paths, prompt, args.batch_size, device, args.repeats)
        rows = [('pre-decoded tensors (model only)', '-', ceiling)]
        for workers in args.workers:
            for name, partitions in (('JPEG files', files), ('JPEG shards', shards)):
                rate = end_to_end_rate(model, transform, tokenizer, partitions, prompt, args.batch_size, workers,
                                       device, args.repeats)
                rows.append((name, str(workers), rate))
    name = torch.cuda.get_device_name(device) if device.type == 'cuda' else f'CPU, {torch.get_num_threads()} threads'
    print(f"{args.model}, {args.precision}, {name}, {args.images} JPEGs of {args.width}x{args.height}, batch "
          f"{args.batch_size}, {os.cpu_count()} cores:\n")
    print('| input | workers | images/s | of pre-decoded |')
    print('|---|---:|---:|---:|')
    for label, workers, rate in rows:
        print(f'| {label} | {workers} | {rate:.1f} | {rate / ceiling:.2f}x |')


if __name__ == '__main__':
    main()
