"""The demo: make an object-counting dataset, train a small adapter model through OpenCLIP, rank, report.

    python -m open_clip_rank.demo [--out demo_output] [--epochs 4]

1. draws images with 0-9 circles, squares or triangles (plus distractors of other kinds) and writes
   train/val CSVs in the training format ("Rank the numbers of circle.");
2. trains a small ViT adapter model from scratch on the CPU with ``python -m open_clip_train.main``
   (OpenCLIP's own entry point; the plugin hooks in through the installed .pth);
3. ranks the validation images with the trained checkpoint (``open_clip_rank.rank``'s API),
   prints per-category SRCC/KRCC/PLCC/MAE/pairwise accuracy and writes a contact sheet.

Exit status 0 when the mean validation SRCC reaches ``--min-srcc`` (0.8), 1 otherwise.
"""
import argparse
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

from .files.atomic import atomic_write

DEMO_MODEL = 'demo-vit-adapter'
# Small enough to train from scratch on 2 CPU cores in about a minute; LayerNorm-only towers,
# because single-category rank batches would leak into BatchNorm statistics of a tower trained from scratch.
DEMO_CONFIG = {
    'embed_dim': 64,
    'vision_cfg': {'image_size': 64, 'layers': 3, 'width': 128, 'head_width': 32, 'patch_size': 8,
                   'output_tokens': True},
    'text_cfg': {'context_length': 16, 'vocab_size': 49408, 'width': 64, 'heads': 4, 'layers': 1,
                 'output_tokens': True},
    'adapter_cfg': {'num_layers': 1, 'd_model': 64, 'n_head': 4, 'num_learnable_text_tokens': 4,
                    'cross_attn_method': 'cross-qkv', 'reg_token_method': 'cross-attn-sum',
                    'adapter_attention_pooler': 'rank-attn', 'n_reg_tokens': 4},
    'misc_cfg': {'model_version': 'clip-adapter-v2'},
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog='python -m open_clip_rank.demo', description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--out', default='demo_output', help='Folder for data, logs, checkpoints and results.')
    p.add_argument('--epochs', type=int, default=4)
    p.add_argument('--batch-size', type=int, default=16)
    p.add_argument('--lr', type=float, default=1e-3)
    p.add_argument('--train-per-count', type=int, default=24, help='Train images per (shape, count).')
    p.add_argument('--val-per-count', type=int, default=6, help='Validation images per (shape, count).')
    p.add_argument('--workers', type=int, default=1)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--min-srcc', type=float, default=0.8, help='Mean validation SRCC the demo must reach.')
    return p.parse_args(argv)


def write_demo_config(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_write(folder / f'{DEMO_MODEL}.json', 'w') as f:
        json.dump(DEMO_CONFIG, f, indent=2)
    return folder


def training_command(args, data, logs: Path):
    return [
        sys.executable, '-m', 'open_clip_train.main',
        '--model', DEMO_MODEL,
        '--dataset-type', 'csv', '--csv-dataset-sample-type', 'rank', '--negative-ratio', '0.2',
        '--train-data', data['train_csv'], '--val-data', data['val_csv'],
        '--loss-opt', 'dual-head', '--loss-components', 'regression', 'rank',
        '--batch-size', str(args.batch_size), '--lr', str(args.lr), '--wd', '0.01', '--warmup', '20',
        '--epochs', str(args.epochs), '--workers', str(args.workers), '--seed', str(args.seed),
        '--precision', 'fp32', '--device', 'cpu', '--logs', str(logs), '--name', 'demo', '--save-frequency', '1',
        '--log-every-n-steps', '20',
    ]


def train(args, data, out: Path, config_dir: Path):
    logs = out / 'logs'
    run = logs / 'demo'
    if run.exists():  # OpenCLIP refuses to overwrite an experiment: keep the old one beside it
        run.rename(logs / f'demo-previous-{int(run.stat().st_mtime)}')
    env = dict(os.environ, OPEN_CLIP_RANK_MODEL_CONFIGS=str(config_dir), PYTHONUNBUFFERED='1')
    cmd = training_command(args, data, logs)
    print('Training:', ' '.join(cmd[1:]), flush=True)
    subprocess.run(cmd, env=env, check=True)
    return run


def rank_validation(data, checkpoint: Path, out: Path):
    from .inference import load_rank_model, score_rows
    from .pictures.contact_sheet import make_contact_sheet
    from .evaluation.metrics import ranking_metrics
    from .rank import rank_within_prompts
    import pandas as pd
    model, transform, tokenizer = load_rank_model(DEMO_MODEL, checkpoint_path=str(checkpoint), device='cpu')
    df = pd.read_csv(data['val_csv'], sep='\t')
    scores, _ = score_rows(model, df.filepath.tolist(), df.title.tolist(), transform, tokenizer)
    metrics = ranking_metrics(scores.numpy(), df.value.to_numpy(float), df.cname.tolist())
    rows = [{'image': p, 'prompt': t, 'score': s, 'target': v}
            for p, t, s, v in zip(df.filepath, df.title, scores.tolist(), df.value.tolist())]
    rank_within_prompts(rows)
    sheet = out / 'val_contact_sheet.png'
    make_contact_sheet(rows, sheet, max_images=20)
    return metrics, sheet


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out).resolve()
    config_dir = write_demo_config(out / 'model_configs')
    os.environ['OPEN_CLIP_RANK_MODEL_CONFIGS'] = str(config_dir)  # this process loads the checkpoint too

    from .synthetic.counting import make_counting_dataset
    data = make_counting_dataset(out / 'data', train_per_count=args.train_per_count,
                                 val_per_count=args.val_per_count, image_size=64, seed=args.seed)
    print(f"Data: {data['num_train']} train / {data['num_val']} val images in {out / 'data'}", flush=True)

    run = train(args, data, out, config_dir)
    checkpoint = run / 'checkpoints' / f'epoch_{args.epochs}.pt'
    metrics, sheet = rank_validation(data, checkpoint, out)

    from .evaluation.metrics import format_metrics_table
    print('\nValidation ranking (held-out images, each scored under its own instruction):')
    print(format_metrics_table(metrics))
    with atomic_write(out / 'val_metrics.json') as f:
        json.dump(metrics, f, indent=2)
    passed = metrics['srcc'] >= args.min_srcc
    print(f"\nMean validation SRCC {metrics['srcc']:.3f} ({'>=' if passed else '<'} {args.min_srcc}: "
          f"{'PASS' if passed else 'FAIL'})")
    print(f"Checkpoint:    {checkpoint}\nTraining log:  {run / 'out.log'}\n"
          f"Per-epoch validation: {run / 'checkpoints' / 'results.jsonl'}\nContact sheet: {sheet}\n"
          f"Rank your own images: python -m open_clip_rank.rank --model {DEMO_MODEL} --checkpoint-path {checkpoint} "
          f"--images FOLDER --prompt 'Rank the numbers of circle.'  (with OPEN_CLIP_RANK_MODEL_CONFIGS={config_dir})")
    return 0 if passed else 1


if __name__ == '__main__':
    sys.exit(main())
