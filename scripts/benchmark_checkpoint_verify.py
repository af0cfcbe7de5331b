"""What checkpoint integrity costs: seconds per GB to write the checksum, to verify a file with it and without it
(the zip's CRC-32s), beside torch.save / torch.load of the same file. Prints a Markdown table.

    python scripts/benchmark_checkpoint_verify.py --gib 1 --folder /tmp

The file is read from the page cache (written just before): the figures are the CPU cost of verification; a cold
read adds the disk's own time, which torch.load pays too.
"""
import argparse
import os
import tempfile
import time

import torch

from open_clip_rank.files import integrity


def _timed(fn, repeats):
    best = float('inf')
    result = None
    for _ in range(repeats):
        integrity._verified.clear()  # noqa: SLF001 - measure the verification, not its cache
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--gib', type=float, default=1.0, help='Size of the checkpoint (float32 tensors of 64 MiB).')
    p.add_argument('--folder', type=str, default=None, help='Where to write the two test files (default: a temp dir).')
    p.add_argument('--repeats', type=int, default=3, help='Best of this many runs per row.')
    args = p.parse_args(argv)
    torch.manual_seed(0)
    numel = 16 * 1024 * 1024
    count = max(1, round(args.gib * 1024 / 64))
    state_dict = {f'layer{i}.weight': torch.randn(numel) for i in range(count)}
    checkpoint = {'epoch': 1, 'name': 'benchmark', 'state_dict': state_dict}
    gib = count * numel * 4 / 2 ** 30
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        plain, summed = os.path.join(folder, 'plain.pt'), os.path.join(folder, 'checksum.pt')
        rows = []
        t, _ = _timed(lambda: torch.save(checkpoint, plain), args.repeats)
        rows.append(('torch.save (no checksum)', t))
        t, with_sum = _timed(lambda: integrity.add_checksum(checkpoint), args.repeats)
        rows.append(('add_checksum (SHA-256 of the content, at save)', t))
        torch.save(with_sum, summed)
        t, _ = _timed(lambda: torch.load(plain, map_location='cpu', weights_only=True), args.repeats)
        rows.append(('torch.load (what every load costs anyway)', t))
        t, reason = _timed(lambda: integrity.verify_file(summed), args.repeats)
        assert reason is None, reason
        rows.append(('verify_file, with the checksum (mmap load + SHA-256)', t))
        t, reason = _timed(lambda: integrity.verify_file(plain), args.repeats)
        assert reason is None, reason
        rows.append(('verify_file, without (the zip\'s CRC-32s)', t))
    print(f"Checkpoint of {gib:.2f} GiB ({count} float32 tensors), {torch.get_num_threads()} torch threads, "
          f"best of {args.repeats}:\n")
    print('| step | seconds | seconds per GiB |')
    print('|---|---:|---:|')
    for name, seconds in rows:
        print(f'| {name} | {seconds:.2f} | {seconds / gib:.2f} |')


if __name__ == '__main__':
    main()
