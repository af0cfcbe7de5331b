#!/usr/bin/env python
"""RankCLIP against the plain CLIP loss on the same small pretraining run, side by side; prints a table.

    python scripts/compare_rankclip_clip.py                      # the test's run, seeds 0 1 2
    python scripts/compare_rankclip_clip.py --epochs 15 --batch-size 32 --accum-freq 1 --seeds 0 1 2 3

The run is ``tests/test_rankclip_training.py``'s by default: the tiny test ViT (``tests/model_configs/tiny-vit.json``)
trained from scratch through ``open_clip_train.main`` on generated captions
(``open_clip_rank.synthetic.captions``: 40 training images per class, 12 classes), 10 epochs of batch 16 with
``--accum-freq 2``, lr 2e-3, wd 0.1, 10 warm-up steps. Each (loss, seed) is one training process; the score is
zero-shot top-1 of the final checkpoint on the 120 held-out images (chance 8.3 %).
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEST_CONFIGS = os.path.join(REPO, 'tests', 'model_configs')
LOSSES = {'rankclip': ['--loss-opt', 'rankclip'], 'clip': []}  # no --loss-opt: OpenCLIP's ClipLoss


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
    p.add_argument('--epochs', type=int, default=10)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--accum-freq', type=int, default=2)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--model', default='tiny-vit')
    return p.parse_args(argv)


def train(args, loss, seed, data, workdir):
    name = f'{loss}-{seed}'
    cmd = [sys.executable, '-m', 'open_clip_train.main', '--model', args.model, '--dataset-type', 'csv',
           '--train-data', data['train'], *LOSSES[loss], '--epochs', str(args.epochs),
           '--batch-size', str(args.batch_size), '--accum-freq', str(args.accum_freq), '--lr', str(args.lr),
           '--wd', '0.1', '--warmup', '10', '--workers', '1', '--seed', str(seed),
           '--save-frequency', str(args.epochs), '--name', name]
    env = dict(os.environ, OPEN_CLIP_RANK_MODEL_CONFIGS=TEST_CONFIGS, CUDA_VISIBLE_DEVICES='', OMP_NUM_THREADS='1')
    result = subprocess.run(cmd, env=env, cwd=workdir, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"{name} failed:\n{result.stderr[-3000:]}")
    return os.path.join(workdir, 'logs', name, 'checkpoints', f'epoch_{args.epochs}.pt')


def main(argv=None):
    args = parse_args(argv)
    import open_clip
    open_clip.add_model_config(TEST_CONFIGS)
    from open_clip_rank.synthetic.captions import make_caption_dataset, zero_shot_accuracy
    with tempfile.TemporaryDirectory() as workdir:
        data = make_caption_dataset(os.path.join(workdir, 'data'), train_per_class=40, val_per_class=10)
        scores = {}
        for seed in args.seeds:
            for loss in LOSSES:
                checkpoint = train(args, loss, seed, data, workdir)
                model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=checkpoint)
                scores[loss, seed] = 100 * zero_shot_accuracy(model, preprocess, open_clip.get_tokenizer(args.model),
                                                              data['val'])
                print(f"{loss} seed {seed}: {scores[loss, seed]:.1f} %", file=sys.stderr, flush=True)
    print(f"zero-shot top-1 on held-out images, {args.epochs} epochs, batch {args.batch_size} x accum "
          f"{args.accum_freq}, lr {args.lr}:\n")
    print('| loss | ' + ' | '.join(f'seed {s}' for s in args.seeds) + ' | mean |')
    print('| --- |' + ' ---: |' * (len(args.seeds) + 1))
    for loss, label in (('rankclip', '`--loss-opt rankclip`'), ('clip', "plain CLIP loss (OpenCLIP's `ClipLoss`)")):
        row = [scores[loss, s] for s in args.seeds]
        print(f'| {label} | ' + ' | '.join(f'{v:.1f} %' for v in row) + f' | {statistics.mean(row):.1f} % |')


if __name__ == '__main__':
    main()
