#!/usr/bin/env python
"""Every GPU table of the project in one prepared run: writes each as Markdown to an output folder.

    bash scripts/gpu_report.sh OUT_DIR                       # on the GPU machine (installs carried wheels first)
    python scripts/gpu_report.py --out OUT_DIR --device cpu --quick   # the same script, tiny sizes, on the CPU

Sections (each one of the project's benchmark scripts in a child process, with a time limit, so one failure or
out-of-memory leaves the others; what a section printed is kept as it is):

* ``pair_head.md``: the pair head alone, the original formula vs ours, fp32 and bf16, N = 64 ... 512, time and
  peak CUDA memory (``scripts/benchmark.py``, convnext_large_d_320-adapter dims);
* ``adapter_step.md``: the whole adapter step, original vs ours (with and without gradient checkpointing);
* ``ranking_throughput.md``: images/s of scoring against the bare image tower on pre-decoded tensors
  (``benchmark.py --mode inference``) for ViT-B-32-adapter and convnext_large_d_320-adapter in bf16, and end to end
  from 1024x768 JPEG files and webdataset shards through the rank CLI's scoring path with 16 DataLoader workers
  (``scripts/benchmark_scoring.py``: decode and resize included, beside the same model on pre-decoded tensors);
* ``feature_cache.md``: an adapter epoch from the frozen-tower cache vs through the tower, convnext_large_d_320-adapter
  (``scripts/benchmark_feature_cache.py``);
* ``rankclip_loss.md``: the RankCLIP loss vs ClipLoss (and the autograd ListMLE), B up to 32,768 where memory allows,
  fp32 and bf16 (``scripts/benchmark_rankclip.py``).

``README.md`` in the output folder lists the machine, the versions, each section's command, time and status.
"""
import argparse
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent
PAPER_MODEL = 'convnext_large_d_320-adapter'


def sections(args):
    """(file name, title, argv, time limit in seconds) of every table, full or --quick."""
    py, dev = sys.executable, ['--device', args.device]
    quick = args.quick
    sizes = ['8', '16'] if quick else ['64', '128', '256', '512']
    out = []
    for dtype in ('float32', 'bfloat16'):
        out.append(('pair_head.md', f'Pair head, {dtype}', [py, str(SCRIPTS / 'benchmark.py'), *dev, '--dtype', dtype,
                                                            '--batch-sizes', *sizes, '--repeats', '2' if quick else '5'],
                    60 if quick else 40))
    for dtype in ('float32', 'bfloat16'):
        out.append(('adapter_step.md', f'Whole adapter step, {dtype}',
                    [py, str(SCRIPTS / 'benchmark.py'), '--mode', 'step', *dev, '--dtype', dtype,
                     '--model', 'ViT-B-32-adapter' if quick else PAPER_MODEL, '--batch-sizes', *(['4'] if quick else sizes),
                     '--repeats', '1' if quick else '5'], 180 if quick else 40))
    for model, n, images in (('ViT-B-32-adapter', ['4'] if quick else ['256', '1024'], '8' if quick else '512'),
                             (PAPER_MODEL, ['2'] if quick else ['64', '256'], '4' if quick else '256')):
        dtype = 'bfloat16' if args.device == 'cuda' else 'float32'  # a CPU without bf16 units: fp32
        out.append(('ranking_throughput.md', f'Scoring {model}, pre-decoded, {dtype}',
                    [py, str(SCRIPTS / 'benchmark.py'), '--mode', 'inference', *dev, '--model', model,
                     '--dtype', dtype, '--batch-sizes', *n, '--repeats', '2' if quick else '5'],
                    120 if quick else 25))
        out.append(('ranking_throughput.md', f'Scoring {model}, end to end from JPEG files and shards (the rank '
                    f'CLI\'s scoring path), {"bf16" if args.device == "cuda" else "fp32"}',
                    [py, str(SCRIPTS / 'benchmark_scoring.py'), *dev, '--model', model,
                     '--precision', 'bf16' if args.device == 'cuda' else 'fp32', '--images', images,
                     '--batch-size', n[0], '--per-shard', '2' if quick else '64',
                     '--workers', *(['0'] if quick else ['16']), '--repeats', '1'], 240 if quick else 60))
    out.append(('feature_cache.md', f'Feature cache vs tower epochs, {"ViT-B-32-adapter" if quick else PAPER_MODEL}',
                [py, str(SCRIPTS / 'benchmark_feature_cache.py'), *dev,
                 '--model', 'ViT-B-32-adapter' if quick else PAPER_MODEL, '--images', '16' if quick else '512',
                 '--batch-size', '8' if quick else '32', '--epochs', '1' if quick else '3'], 300 if quick else 70))
    out.append(('rankclip_loss.md', 'RankCLIP loss vs ClipLoss, forward + backward',
                [py, str(SCRIPTS / 'benchmark_rankclip.py'), *dev, '--precision', *(['fp32'] if quick else ['fp32', 'bf16']),
                 '--batch-sizes', *(['128', '256'] if quick else ['1024', '4096', '8192', '16384', '32768']),
                 '--repeats', '1' if quick else '3', '--max-seconds', '5' if quick else '10'], 180 if quick else 80))
    return out


def run_sections(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED='1')
    summary, started = [], time.time()
    for name in dict.fromkeys(s[0] for s in sections(args)):
        (out / name).write_text('')
    for name, title, argv, limit in sections(args):
        begin = time.time()
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=limit, env=env)
            status = 'ok' if done.returncode == 0 else f'exit {done.returncode}'
            text = done.stdout + ('' if done.returncode == 0 else f'\n```\n{done.stderr[-3000:]}\n```\n')
        except subprocess.TimeoutExpired as err:
            status = f'stopped after {limit} s'
            text = (err.stdout.decode() if isinstance(err.stdout, bytes) else err.stdout or '') + \
                f'\n(stopped after {limit} s: the rows above are complete)\n'
        seconds = time.time() - begin
        with open(out / name, 'a') as f:
            f.write(f'## {title}\n\n`{" ".join(Path(a).name if a.endswith(".py") else a for a in argv[1:])}`'
                    f' ({seconds:.0f} s, {status})\n\n{text.strip()}\n\n')
        summary.append((title, name, status, seconds))
        print(f'{title}: {status} ({seconds:.0f} s)', flush=True)
    (out / 'README.md').write_text(_summary(args, summary, time.time() - started))


def _summary(args, summary, total):
    import torch
    where = torch.cuda.get_device_name() if args.device == 'cuda' and torch.cuda.is_available() else \
        f'CPU ({os.cpu_count()} cores)'
    lines = [f'# GPU report: {where}', '',
             f'torch {torch.__version__}, Python {platform.python_version()}, {"quick" if args.quick else "full"} '
             f'sizes, {total:.0f} s in all.', '', '| section | file | status | seconds |', '| --- | --- | --- | ---: |']
    lines += [f'| {title} | {name} | {status} | {seconds:.0f} |' for title, name, status, seconds in summary]
    return '\n'.join(lines) + '\n'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--out', default='gpu_report')
    p.add_argument('--device', default=None, help='cuda (default when available) or cpu')
    p.add_argument('--quick', action='store_true', help='tiny sizes: a check of the script itself (CPU)')
    args = p.parse_args(argv)
    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    run_sections(args)
    return 0


if __name__ == '__main__':
    sys.exit(main())
