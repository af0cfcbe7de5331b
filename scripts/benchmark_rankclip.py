"""Cost of RankCLIP's loss against OpenCLIP's plain ClipLoss: forward + backward of the loss alone.

    python scripts/benchmark_rankclip.py [--batch-sizes 256 512 1024 2048 4096] [--dim 512] [--repeats 3]

Features are random unit vectors [B, dim] with gradients, logit scale 100, the ramp at its peak (all four
ListMLE lists computed). Each (loss, batch size) runs in a fresh child process, so the peak memory column
is that process's own: on a GPU ``torch.cuda.max_memory_allocated``, on the CPU the growth of the peak
resident set size (``ru_maxrss``) over the set-up (inputs allocated; coarse: the allocator may reuse memory). Prints a Markdown table (median time of ``--repeats``).
"""
import argparse
import json
import resource
import statistics
import subprocess
import sys
import time


def run_one(loss_name: str, batch_size: int, dim: int, repeats: int, device: str, threads: int) -> dict:
    import torch
    if threads:
        torch.set_num_threads(threads)
    from open_clip.loss import ClipLoss
    from open_clip_rank.losses.rankclip import RankCLIPLoss

    torch.manual_seed(0)
    if loss_name == 'clip':
        loss = ClipLoss()
    else:
        loss = RankCLIPLoss()
        loss.set_epoch(10, 10)  # the ramp at its peak: every term computed
    image = torch.nn.functional.normalize(torch.randn(batch_size, dim, device=device), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(batch_size, dim, device=device), dim=-1).requires_grad_()
    scale = torch.tensor(100.0, device=device)

    def step():
        image.grad = text.grad = None
        loss(image, text, scale).backward()
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
    parser.add_argument('--one', nargs=2, metavar=('LOSS', 'BATCH'), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch
        args.device = 'cuda' if torch.cuda.is_available() else 'cpu'
    if args.one:
        print(json.dumps(run_one(args.one[0], int(args.one[1]), args.dim, args.repeats, args.device, args.threads)))
        return

    import torch
    threads = args.threads or torch.get_num_threads()
    where = torch.cuda.get_device_name() if args.device == 'cuda' else f'CPU, {threads} thread(s)'
    memory = 'peak extra GPU memory' if args.device == 'cuda' else 'peak RSS growth'
    print(f'RankCLIP loss vs ClipLoss, forward + backward, dim {args.dim}, {where}, torch {torch.__version__}\n')
    print(f'| batch | ClipLoss ms | RankCLIP ms | ratio | ClipLoss {memory} MiB | RankCLIP {memory} MiB |')
    print('| ---: | ---: | ---: | ---: | ---: | ---: |')
    for batch_size in args.batch_sizes:
        results = {}
        for name in ('clip', 'rankclip'):
            out = subprocess.run([sys.executable, __file__, '--one', name, str(batch_size), '--dim', str(args.dim),
                                  '--repeats', str(args.repeats), '--device', args.device,
                                  '--threads', str(args.threads)],
                                 capture_output=True, text=True, check=True)
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        clip, rank = results['clip'], results['rankclip']
        print(f"| {batch_size} | {clip['ms']:.1f} | {rank['ms']:.1f} | {rank['ms'] / clip['ms']:.1f}x | "
              f"{clip['peak_mib']:.0f} | {rank['peak_mib']:.0f} |", flush=True)


if __name__ == '__main__':
    main()
