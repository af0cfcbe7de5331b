"""Cost of RankCLIP's loss against OpenCLIP's plain ClipLoss: forward + backward of the loss alone.

    python scripts/benchmark_rankclip.py [--batch-sizes 256 512 1024 2048 4096] [--dim 512] [--repeats 3]
                                         [--precision fp32 bf16] [--device cpu|cuda]

Three losses side by side in one run: OpenCLIP's ``ClipLoss``, ``RankCLIPLoss`` as shipped (ListMLE with its
closed-form gradient, ``losses/listmle.py``) and ``RankCLIPLoss`` with the autograd ListMLE of the previous release
(``list_mle_autograd``, the same values and gradients). Features are random unit vectors [B, dim] with gradients,
logit scale 100, the ramp at its peak (all four ListMLE lists computed); ``bf16`` runs the loss under autocast.
Each (loss, batch size) runs in a fresh child process, so the memory column is that process's own: on a GPU
``torch.cuda.max_memory_allocated`` over the inputs; on the CPU the growth of the peak resident set size
(``ru_maxrss``) over the set-up, measured in a second child with glibc's mmap threshold fixed
(``MALLOC_MMAP_THRESHOLD_``) so that every large tensor is its own mapping, returned when freed: the peak then
tracks the live memory, not the allocator's cache (times come from the first child, with the default allocator).
Prints a Markdown table (median time of ``--repeats``).
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


LOSSES = ('clip', 'rankclip', 'rankclip-autograd')
MMAP_THRESHOLD = str(1 << 16)


def run_one(loss_name: str, batch_size: int, dim: int, repeats: int, device: str, threads: int,
            precision: str = 'fp32') -> dict:
    import contextlib
    import torch
    if threads:
        torch.set_num_threads(threads)
    from open_clip.loss import ClipLoss
    from open_clip_rank.losses import listmle, rankclip

    torch.manual_seed(0)
    if loss_name == 'clip':
        loss = ClipLoss()
    else:
        if loss_name == 'rankclip-autograd':  # the previous release's ListMLE, for the side-by-side
            rankclip.list_mle = listmle.list_mle_autograd
        loss = rankclip.RankCLIPLoss()
        loss.set_epoch(10, 10)  # the ramp at its peak: every term computed
    autocast = torch.autocast(device, dtype=torch.bfloat16) if precision == 'bf16' else contextlib.nullcontext()
    image = torch.nn.functional.normalize(torch.randn(batch_size, dim, device=device), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(batch_size, dim, device=device), dim=-1).requires_grad_()
    scale = torch.tensor(100.0, device=device)

    def step():
        image.grad = text.grad = None
        with autocast:
            value = loss(image, text, scale)
        value.backward()
        if device == 'cuda':
            torch.cuda.synchronize()

    if device == 'cuda':
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step()  # warm-up (counted in the peak)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    if device == 'cuda':
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {'ms': 1000 * statistics.median(times), 'peak_mib': peak / 2 ** 20}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--batch-sizes', type=int, nargs='+', default=[256, 512, 1024, 2048, 4096])
    parser.add_argument('--dim', type=int, default=512)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument('--device', default=None, help='cpu or cuda (default: cuda when available)')
    parser.add_argument('--threads', type=int, default=0,
                        help="CPU threads (torch.set_num_threads); 0: torch's default. 1 is steadier on a shared machine")
    parser.add_argument('--precision', nargs='+', default=['fp32'], choices=('fp32', 'bf16'),
                        help='fp32, and/or bf16 autocast')
    parser.add_argument('--max-seconds', type=float, default=0,
                        help='skip the larger batches of a loss once one run took longer than this (0: no limit)')
    parser.add_argument('--one', nargs=3, metavar=('LOSS', 'BATCH', 'PRECISION'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.dim, args.repeats, args.device, args.threads,
                                 args.one[2])))
        return

    import torch
    threads = args.threads or torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device == 'cuda' else f'CPU, {threads} thread(s)'
    memory = 'peak extra GPU memory' if args.device == 'cuda' else 'peak RSS growth'
    print(f'RankCLIP loss vs ClipLoss, forward + backward, dim {args.dim}, {where}, torch {torch.__version__}\n')
    print(f'| precision | batch | ClipLoss ms | RankCLIP ms | ratio | RankCLIP autograd ListMLE ms | ClipLoss {memory} MiB '
          f'| RankCLIP {memory} MiB | ratio | RankCLIP autograd ListMLE {memory} MiB |')
    print('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |')
    slow = set()
    for precision in args.precision:
        for batch_size in args.batch_sizes:
            results = {}
            for name in LOSSES:
                if (precision, name) in slow:
                    results[name] = None
                    continue
                results[name] = _measure(args, name, batch_size, precision)
                if results[name] is None:  # e.g. out of memory: n/a, the table goes on
                    slow.add((precision, name))
                    continue
                if args.max_seconds and results[name]['ms'] > 1000 * args.max_seconds:
                    slow.add((precision, name))
            print(_row(precision, batch_size, results), flush=True)


def _child(args, name, batch_size, precision, repeats, env=None):
    out = subprocess.run([sys.executable, __file__, '--one', name, str(batch_size), precision, '--dim', str(args.dim),
                          '--repeats', str(repeats), '--device', args.device, '--threads', str(args.threads)],
                         capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None


def _measure(args, name, batch_size, precision):
    """Time from a child with the default allocator; on the CPU, memory from one with a fixed mmap threshold."""
    timed = _child(args, name, batch_size, precision, args.repeats)
    if timed is None or args.device != 'cpu':
        return timed
    sized = _child(args, name, batch_size, precision, 1, env=dict(os.environ, MALLOC_MMAP_THRESHOLD_=MMAP_THRESHOLD))
    return dict(timed, peak_mib=sized['peak_mib'] if sized else float('nan'))


def _row(precision, batch_size, results):
    def cell(name, key, fmt):
        return fmt.format(results[name][key]) if results.get(name) else 'n/a'

    def ratio(key):
        if not results.get('clip') or not results.get('rankclip') or results['clip'][key] <= 0:
            return 'n/a'
        return f"{results['rankclip'][key] / results['clip'][key]:.1f}x"

    return (f"| {precision} | {batch_size} | {cell('clip', 'ms', '{:.1f}')} | {cell('rankclip', 'ms', '{:.1f}')} | "
            f"{ratio('ms')} | {cell('rankclip-autograd', 'ms', '{:.1f}')} | {cell('clip', 'peak_mib', '{:.0f}')} | "
            f"{cell('rankclip', 'peak_mib', '{:.0f}')} | {ratio('peak_mib')} | "
            f"{cell('rankclip-autograd', 'peak_mib', '{:.0f}')} |")


if __name__ == '__main__':
    main()
