#!/usr/bin/env python
"""Speed and memory of the pair head and of the whole adapter step: the original formula vs open_clip_rank's.

    python scripts/benchmark.py                      # CPU, or CUDA when available
    python scripts/benchmark.py --mode step          # whole adapter step (convnext_large_d_320-adapter dims)
    python scripts/benchmark.py --mode inference --model ViT-B-32-adapter   # images/s vs the bare image tower
    python scripts/benchmark.py --device cuda --dim 768 --tokens 100 --queries 16 --batch-sizes 64 128 256
    python scripts/benchmark.py --official-repo PATH/TO/RankingAwareCLIP   # run the original class itself

Each row is forward + backward of the pair head alone (docs/adapter.md), median of ``--repeats`` runs
after a warm-up, and peak memory above the inputs: ``torch.cuda.max_memory_allocated`` on CUDA, the
process's peak RSS (VmHWM) on CPU (each measurement in a fresh subprocess, so peaks do not mix). The original
is, by default, ``open_clip_rank.models.pair_reference.quadratic_pair_attention`` (the official algorithm restated and
tested equal); with ``--official-repo`` the official ``MultiHeadRankawareAttentionV2`` class is loaded from
a checkout of uynaes/RankingAwareCLIP and run with the same weights.

``--mode step``: forward + backward of the whole adapter (fusion blocks, post-fusion encoder, regression and
pair heads, dual-head loss) in training mode on random image / text tokens (the towers are not part of it).
"official" runs the same weights the way the official code computes them: OpenCLIP's ``ResidualAttentionBlock``
and PyTorch's ``nn.TransformerEncoderLayer`` forwards and the N*N pair head of ``pair_reference``; "ours"
is ``RankAdapter`` as it is, "ours+ckpt" the same with ``set_grad_checkpointing(True)``. Memory: the process's
peak RSS (fresh subprocess per row), shown as the growth over the built model and inputs and as the whole process.

``--mode inference``: images/s of scoring (image tower, the text tower once for the prompt, adapter, regression
head: ``score_tokens(encode_image_tokens(images), encode_prompts(prompt))``, as the rank CLI does) against the bare
image tower's forward (``model.encode_image_tokens``), no gradients, random weights.
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
    p.add_argument('--mode', default='pair-head', choices=['pair-head', 'step', 'inference'])
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    p.add_argument('--model', default='convnext_large_d_320-adapter',
                   help='--mode step: adapter dims from this config; --mode inference: the model to run')
    p.add_argument('--text-tokens', type=int, default=77, help='--mode step: context length of the text tokens')
    p.add_argument('--impls', nargs='+', default=['official', 'ours', 'ours+ckpt'], help='--mode step rows')
    p.add_argument('--malloc-mmap-threshold', type=int, default=None,
                   help='CPU: run the measuring subprocesses with MALLOC_MMAP_THRESHOLD_ set to this many bytes (glibc '
                        'then returns freed large blocks to the system instead of keeping them in its heap)')
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
    p.add_argument('--_one', default=None, help=argparse.SUPPRESS)
    p.add_argument('--_step', action='store_true', help=argparse.SUPPRESS)  # internal: one measurement as JSON
    return p.parse_args(argv)


def peak_rss_bytes():
    """This process's peak RSS: VmHWM on Linux (its own address space; ``ru_maxrss`` can carry the parent's
    peak across fork + exec), else ``ru_maxrss``."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    scale = 1 if sys.platform == 'darwin' else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


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
    from open_clip_rank.models.pair_reference import quadratic_pair_attention
    if impl == 'factorised':
        return lambda q, x: ours(q, x)
    if official is not None:  # the original class: [1, Q, D] queries, [N*N, Q, D] out, summed over queries
        return lambda q, x: official(q.unsqueeze(0), x).sum(dim=1)
    return lambda q, x: quadratic_pair_attention(ours, q, x)


def measure_one(args, impl, n):
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
        base = peak_rss_bytes()
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
        peak = peak_rss_bytes() - base
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


# --- whole adapter step ------------------------------------------------------------------------------

def build_adapter(args, device, dtype):
    import open_clip
    import torch
    from open_clip_rank.models.adapter_layers import AdapterCfg, RankAdapter
    cfg = open_clip.get_model_config(args.model)
    torch.manual_seed(0)
    adapter_cfg = AdapterCfg.from_dict(cfg['adapter_cfg'])
    return RankAdapter(adapter_cfg).to(device, dtype).train(), adapter_cfg


def official_adapter_forward(adapter, image_tokens, text_tokens):
    """The adapter's weights, computed as the official code does: OpenCLIP's ResidualAttentionBlock and
    PyTorch's TransformerEncoderLayer forwards (nn.MultiheadAttention), the N*N concatenated-softmax pair head."""
    import torch
    from torch import nn
    from open_clip.transformer import ResidualAttentionBlock
    from open_clip_rank.models.pair_reference import quadratic_pair_attention
    n, _, width = text_tokens.shape
    if adapter.learnable_text_tokens is not None:
        prefix = adapter.learnable_text_tokens.view(1, -1, 1).expand(n, -1, width)
        text_tokens = torch.cat([prefix, text_tokens], dim=1)
    block = adapter.crossmodal_block
    x = image_tokens
    for self_block, cross_block in zip(block.resblocks, block.cross_attn):
        x = ResidualAttentionBlock.forward(self_block, x)
        x = ResidualAttentionBlock.forward(cross_block, x, k_x=text_tokens, v_x=text_tokens)
    x = block.ln_final(x) @ block.projection
    if isinstance(adapter.post_fuse_block, nn.TransformerEncoder):
        for layer in adapter.post_fuse_block.layers:
            x = nn.TransformerEncoderLayer.forward(layer, x)
    pair = quadratic_pair_attention(adapter.reg_token_pooler, adapter.reg_tokens, x)
    return adapter.scores(x), adapter.pair_regressor(pair).squeeze(-1)


def step_inputs(args, adapter_cfg, n, device, dtype):
    import torch
    gen = torch.Generator().manual_seed(n)
    d = adapter_cfg.d_model
    image_tokens = torch.randn(n, args.tokens, d, generator=gen).to(device, dtype).requires_grad_(True)
    text_tokens = torch.randn(n, args.text_tokens, d, generator=gen).to(device, dtype).requires_grad_(True)
    targets = torch.randint(0, 5, (n,), generator=gen).float().to(device)
    return image_tokens, text_tokens, targets


def step_runner(impl, adapter):
    from open_clip_rank.losses.ranking import RankingLoss
    loss_fn = RankingLoss('dual', ['regression', 'rank'])
    adapter.set_grad_checkpointing(impl == 'ours+ckpt')
    forward = (lambda i, t: official_adapter_forward(adapter, i, t)) if impl == 'official' else adapter

    def step(image_tokens, text_tokens, targets):
        adapter.zero_grad(set_to_none=True)
        scores, pair_logits = forward(image_tokens, text_tokens)
        loss = loss_fn(rank_scores=scores.float(), pair_logits=pair_logits.float(), targets=targets)
        loss.backward()
        return loss.detach()
    return step


def measure_step(args, impl, n):
    import torch
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    adapter, adapter_cfg = build_adapter(args, device, dtype)
    inputs = step_inputs(args, adapter_cfg, n, device, dtype)
    step = step_runner(impl, adapter)
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    rss = peak_rss_bytes
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = rss()
    times = []
    for _ in range(1 + args.repeats):  # the first (warm-up) step sets the CPU peak; with --repeats 0 it is timed
        start = time.perf_counter()
        step(*inputs)
        sync()
        times.append(time.perf_counter() - start)
    times = times[1:] or times
    if device.type == 'cuda':
        peak, total = torch.cuda.max_memory_allocated() - base, torch.cuda.max_memory_allocated()
    else:
        peak, total = rss() - base, rss()
    return {'impl': impl, 'n': n, 's': statistics.median(times), 'peak_gib': max(peak, 0) / 2 ** 30,
            'total_gib': total / 2 ** 30}


def step_estimated_gib(args, impl, n):
    bytes_per = 2 if args.dtype == 'bfloat16' else 4
    base = 60 * n * args.tokens * args.dim * bytes_per / 2 ** 30  # ~60 token-sized activations kept for backward
    if impl == 'official':
        return base + estimated_gib(args, 'original', n)
    return base


def run_step_subprocess(args, impl, n):
    argv = [sys.executable, __file__, '--mode', 'step', '--_step', '--_one', f'{impl}:{n}', '--device', args.device,
            '--model', args.model, '--tokens', str(args.tokens), '--text-tokens', str(args.text_tokens),
            '--dtype', args.dtype, '--repeats', str(args.repeats)]
    env = dict(os.environ)
    if args.malloc_mmap_threshold is not None:
        env['MALLOC_MMAP_THRESHOLD_'] = str(args.malloc_mmap_threshold)
    out = subprocess.run(argv, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {'impl': impl, 'n': n, 'error': (out.stderr.strip().splitlines() or ['killed'])[-1][:60]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_step_same_values(args):
    """Ours and the official formula give the same loss and gradients (float64, eval mode, small N)."""
    import torch
    saved = args.dtype, args.tokens, args.text_tokens
    args.dtype, args.tokens, args.text_tokens = 'float64', 5, 4
    adapter, adapter_cfg = build_adapter(args, torch.device('cpu'), torch.float64)
    adapter.eval()
    inputs = step_inputs(args, adapter_cfg, 3, torch.device('cpu'), torch.float64)
    results = []
    for impl in ('official', 'ours'):
        loss = step_runner(impl, adapter)(*inputs)
        results.append([loss] + [p.grad.clone() for p in adapter.parameters() if p.grad is not None])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    args.dtype, args.tokens, args.text_tokens = saved


def step_table(args):
    import open_clip
    import torch
    args.dim = open_clip.get_model_config(args.model)['adapter_cfg']['d_model']
    if args.tokens == 49 and 'convnext_large_d_320' in args.model:
        args.tokens = 100  # 320 px / 32: the 10x10 map
    check_step_same_values(args)
    device_name = torch.cuda.get_device_name() if args.device == 'cuda' else f'CPU ({os.cpu_count()} cores)'
    print(f"adapter step (forward + backward + dual-head loss, training mode) on {device_name}, {args.dtype}, "
          f"{args.model} adapter dims, D={args.dim}, P={args.tokens} image tokens, {args.text_tokens} text tokens; "
          f"time: {'first step' if args.repeats == 0 else f'median of {args.repeats} after a warm-up'}; "
          f"memory: peak growth over model+inputs (whole process in brackets)"
          + (f"; MALLOC_MMAP_THRESHOLD_={args.malloc_mmap_threshold}" if args.malloc_mmap_threshold is not None else ''))
    header = f"{'N':>5} | " + ' | '.join(f"{impl + ' s':>12} | {impl + ' GiB':>18}" for impl in args.impls)
    print(header)
    print('-' * len(header))
    rows = []
    for n in args.batch_sizes:
        cells = []
        for impl in args.impls:
            if step_estimated_gib(args, impl, n) > args.max_gib:
                r = {'impl': impl, 'n': n, 'error': f'skipped (~{step_estimated_gib(args, impl, n):.0f} GiB)'}
            elif args.device == 'cpu':
                r = run_step_subprocess(args, impl, n)
            else:
                try:
                    r = measure_step(args, impl, n)
                except torch.cuda.OutOfMemoryError:
                    r = {'impl': impl, 'n': n, 'error': 'out of memory'}
                torch.cuda.empty_cache()
            rows.append(r)
            cells += ([r['error'][:30], ''] if 'error' in r else
                      [f"{r['s']:.2f}", f"{r['peak_gib']:.2f} ({r['total_gib']:.2f})"])
        print(f"{n:>5} | " + ' | '.join(f"{a:>12} | {b:>18}" for a, b in zip(cells[::2], cells[1::2])), flush=True)
    return rows


# --- inference: images/s against the bare image tower ----------------------------------------------

def inference_table(args):
    import open_clip
    import torch
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    torch.manual_seed(0)
    model = open_clip.create_model(args.model).to(device, dtype).eval()
    size = model.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    tokenizer = open_clip.get_tokenizer(args.model)
    prompt = tokenizer(['Rank the image quality'])
    sync = torch.cuda.synchronize if device.type == 'cuda' else (lambda: None)
    print(f"inference on {torch.cuda.get_device_name() if args.device == 'cuda' else f'CPU ({os.cpu_count()} cores)'}, "
          f"{args.dtype}, {args.model} at {size[0]}x{size[1]}, no gradients; median of {max(args.repeats, 1)} "
          f"after a warm-up")
    header = f"{'N':>5} | {'image tower img/s':>17} | {'scoring img/s':>17} | ratio"
    print(header)
    print('-' * len(header))
    rows = []
    for n in args.batch_sizes:
        images = torch.randn(n, 3, *size, device=device, dtype=dtype)
        texts = prompt.to(device)
        result = {}
        # the rank CLI's path: the text tower once per prompt, the image tower and the adapter per image
        for what, fn in (('tower', lambda: model.encode_image_tokens(images)),
                         ('adapter', lambda: model.score_tokens(model.encode_image_tokens(images),
                                                                model.encode_prompts(texts)))):
            times = []
            with torch.no_grad():
                for i in range(1 + max(args.repeats, 1)):
                    start = time.perf_counter()
                    fn()
                    sync()
                    times.append(time.perf_counter() - start)
            result[what] = n / statistics.median(times[1:])
        rows.append({'n': n, 'tower_img_s': result['tower'], 'rank_scores_img_s': result['adapter']})
        print(f"{n:>5} | {result['tower']:>17.1f} | {result['adapter']:>17.1f} | {result['adapter'] / result['tower']:.2f}",
              flush=True)
    return rows


def main(argv=None):
    args = parse_args(argv)
    import torch
    import open_clip_rank  # noqa: F401  (registers the plugin where no .pth file is processed)
    args.device = args.device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if args._one:
        impl, n = args._one.split(':')
        print(json.dumps((measure_step if args._step else measure_one)(args, impl, int(n))))
        return 0
    if args.mode != 'pair-head':
        rows = (step_table if args.mode == 'step' else inference_table)(args)
        if args.json:
            with open(args.json, 'w') as f:
                json.dump({'config': {k: v for k, v in vars(args).items() if not k.startswith('_')}, 'rows': rows}, f,
                          indent=2)
        return 0
    original = ('official class' if args.official_repo
                else 'official algorithm (open_clip_rank/models/pair_reference.py)')
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
