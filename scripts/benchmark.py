#!/usr/bin/env python
"""Speed and memory of the pair head: the original N*N form vs open_clip_rank's factorised form.

    python scripts/benchmark.py                      # CPU, or CUDA when available
    python scripts/benchmark.py --device cuda --dim 768 --tokens 100 --queries 16 --batch-sizes 64 128 256
    python scripts/benchmark.py --official-repo PATH/TO/RankingAwareCLIP   # run the original class itself

Each row is forward + backward of the pair head alone (as in DESIGN.md), median of ``--repeats`` runs
after a warm-up, and peak memory above the inputs: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's peak RSS on CPU (each measurement in a fresh subprocess, so peaks do not mix). The original
is, by default, ``tests/reference_pair_head.quadratic_pair_attention`` (the official algorithm restated and
tested equal); with ``--official-repo`` the official ``MultiHeadRankawareAttentionV2`` class is loaded from
a checkout of uynaes/RankingAwareCLIP and run with the same weights.
"""
import argparse
import ast
import json
import os
import statistics
import subprocess
import sys
import time

OFFICIAL_FILE = 'libs/open_clip/src/open_clip/clip_model_adapter.py'
OFFICIAL_CLASS = 'MultiHeadRankawareAttentionV2'


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--dim', type=int, default=256)
    p.add_argument('--heads', type=int, default=8)
    p.add_argument('--tokens', type=int, default=49, help='P, tokens per image (7x7 map)')
    p.add_argument('--queries', type=int, default=16, help='Q, rank queries (n_reg_tokens)')
    p.add_argument('--batch-sizes', type=int, nargs='+', default=[16, 32, 64])
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
    p.add_argument('--repeats', type=int, default=5)
    p.add_argument('--max-gib', type=float, default=8.0, help='Skip runs estimated to need more memory.')
    p.add_argument('--official-repo', default=None, help='Checkout of uynaes/RankingAwareCLIP (optional).')
    p.add_argument('--json', default=None, help='Also write the rows as JSON here.')
    p.add_argument('--_one', default=None, help=argparse.SUPPRESS)  # internal: one measurement as JSON
    return p.parse_args(argv)


def load_official_class(repo):
    """The official class, taken from its source file by name (it needs only torch)."""
    import torch
    from torch import nn
    from torch.nn import functional as F
    from typing import Callable, Optional
    source = open(os.path.join(repo, OFFICIAL_FILE)).read()
    node = next(n for n in ast.parse(source).body if isinstance(n, ast.ClassDef) and n.name == OFFICIAL_CLASS)
    namespace = {'torch': torch, 'nn': nn, 'F': F, 'Optional': Optional, 'Callable': Callable}
    exec(compile(ast.Module([node], []), OFFICIAL_FILE, 'exec'), namespace)
    return namespace[OFFICIAL_CLASS]


def build(args, device, dtype):
    import torch
    from open_clip.transformer import LayerNorm
    from open_clip_rank.models.adapter_layers import RankAwarePairAttention
    torch.manual_seed(0)
    ours = RankAwarePairAttention(args.dim, args.heads, LayerNorm).to(device, dtype)
    official = None
    if args.official_repo:
        official = load_official_class(args.official_repo)(d_model=args.dim, num_heads=args.heads,
                                                           norm_layer=LayerNorm).to(device, dtype)
        official.load_state_dict(ours.state_dict())
    return ours, official


def make_runner(impl, ours, official, n_queries):
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, 'tests'))
    from reference_pair_head import quadratic_pair_attention
    if impl == 'factorised':
        return lambda q, x: ours(q, x)
    if official is not None:  # the original class: [1, Q, D] queries, [N*N, Q, D] out, summed over queries
        return lambda q, x: official(q.unsqueeze(0), x).sum(dim=1)
    return lambda q, x: quadratic_pair_attention(ours, q, x)


def measure_one(args, impl, n):
    import resource
    import torch
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    ours, official = build(args, device, dtype)
    run = make_runner(impl, ours, official, args.queries)
    queries = torch.randn(args.queries, args.dim, device=device, dtype=dtype, requires_grad=True)
    tokens = torch.randn(n, args.tokens, args.dim, device=device, dtype=dtype, requires_grad=True)
    weights = torch.randn(n * n, args.dim, device=device, dtype=dtype)

    def step():
        out = run(queries, tokens).reshape(n * n, -1)
        (out * weights).sum().backward()

    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:  # lifetime peak RSS: taken before the first (warm-up) step, which sets the peak on CPU
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()
    sync()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    if device.type == 'cuda':
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {'impl': impl, 'n': n, 'ms': 1000 * statistics.median(times), 'peak_gib': max(peak, 0) / 2 ** 30}


def check_same_values(args):
    """Both implementations give the same pair features (float64, small N) before anything is timed."""
    import torch
    saved = args.dtype
    ours, official = build(args, torch.device('cpu'), torch.float64)
    queries, tokens = torch.randn(args.queries, args.dim, dtype=torch.float64), torch.randn(5, 7, args.dim, dtype=torch.float64)
    a = make_runner('factorised', ours, official, args.queries)(queries, tokens).reshape(25, -1)
    b = make_runner('original', ours, official, args.queries)(queries, tokens).reshape(25, -1)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    args.dtype = saved


def estimated_gib(args, impl, n):
    bytes_per = 2 if args.dtype == 'bfloat16' else 4
    if impl == 'factorised':
        return 4 * n * n * args.dim * bytes_per / 2 ** 30
    return 6 * n * n * (2 * args.tokens) * (args.dim + args.heads * args.queries) * bytes_per / 2 ** 30


def cpu_peak_in_subprocess(args, impl, n):
    """Fresh interpreter per measurement: ru_maxrss is a lifetime peak."""
    argv = [sys.executable, __file__, '--_one', f'{impl}:{n}', '--device', args.device, '--dim', str(args.dim),
            '--heads', str(args.heads), '--tokens', str(args.tokens), '--queries', str(args.queries),
            '--dtype', args.dtype, '--repeats', str(args.repeats)]
    if args.official_repo:
        argv += ['--official-repo', args.official_repo]
    out = subprocess.run(argv, capture_output=True, text=True)
    if out.returncode != 0:
        return {'impl': impl, 'n': n, 'error': out.stderr.strip().splitlines()[-1][:80]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    args = parse_args(argv)
    import torch
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if args._one:
        impl, n = args._one.split(':')
        print(json.dumps(measure_one(args, impl, int(n))))
        return 0
    original = 'official class' if args.official_repo else 'official algorithm (tests/reference_pair_head.py)'
    check_same_values(args)
    device_name = torch.cuda.get_device_name() if args.device == 'cuda' else f'CPU ({os.cpu_count()} cores)'
    print(f"pair head forward+backward on {device_name}, {args.dtype}, D={args.dim}, heads={args.heads}, "
          f"P={args.tokens}, Q={args.queries}; original = {original}")
    rows = []
    header = f"{'N':>5} | {'original ms':>12} | {'original GiB':>12} | {'factorised ms':>13} | {'factorised GiB':>14} | speed-up"
    print(header)
    print('-' * len(header))
    for n in args.batch_sizes:
        result = {}
        for impl in ('original', 'factorised'):
            if estimated_gib(args, impl, n) > args.max_gib:
                result[impl] = {'impl': impl, 'n': n, 'error': f'skipped (~{estimated_gib(args, impl, n):.0f} GiB)'}
            elif args.device == 'cpu':
                result[impl] = cpu_peak_in_subprocess(args, impl, n)
            else:
                try:
                    result[impl] = measure_one(args, impl, n)
                except torch.cuda.OutOfMemoryError:
                    result[impl] = {'impl': impl, 'n': n, 'error': 'out of memory'}
                torch.cuda.empty_cache()
        rows += result.values()
        cells = []
        for impl in ('original', 'factorised'):
            r = result[impl]
            cells += [r['error'], ''] if 'error' in r else [f"{r['ms']:.1f}", f"{r['peak_gib']:.3f}"]
        speed = (f"{result['original']['ms'] / result['factorised']['ms']:.1f}x"
                 if 'ms' in result['original'] and 'ms' in result['factorised'] else '-')
        print(f"{n:>5} | {cells[0]:>12} | {cells[1]:>12} | {cells[2]:>13} | {cells[3]:>14} | {speed}")
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'config': {k: v for k, v in vars(args).items() if not k.startswith('_')}, 'rows': rows}, f,
                      indent=2)
    return 0


if __name__ == '__main__':
    sys.exit(main())
