"""End-to-end: OrdinalCLIP models train through OpenCLIP's entry point, learn, and rank with the CLI."""
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from helpers import TEST_CONFIG_DIR, run_openclip_main, subprocess_env
from open_clip_rank.synthetic.ordinal import make_ordinal_dataset

NUM_RANKS = 6


@pytest.fixture(scope='module')
def ordinal_data(tmp_path_factory):
    return make_ordinal_dataset(tmp_path_factory.mktemp('ordinal'), num_ranks=NUM_RANKS, train_per_rank=32,
                                val_per_rank=10, image_size=32, seed=0)


@pytest.fixture(scope='module')
def small_data(tmp_path_factory):
    return make_ordinal_dataset(tmp_path_factory.mktemp('ordinal_small'), num_ranks=NUM_RANKS, train_per_rank=4,
                                val_per_rank=1, image_size=32, seed=1)


def _train(args, logs, name, launcher=None, in_process=False):
    argv = ['--model', 'tiny-rn-ordinal', '--dataset-type', 'csv', '--csv-dataset-sample-type', 'ordinal',
            '--batch-size', '8', '--lr', '1e-3', '--warmup', '2', '--workers', '1', '--seed', '0', '--name', name,
            *args]
    return run_openclip_main(argv, logs, launcher, in_process, timeout=900)


def _results(logs, name):
    lines = (Path(logs) / 'logs' / name / 'checkpoints' / 'results.jsonl').read_text().splitlines()
    return [json.loads(line) for line in lines]


def _rank(args):
    cmd = [sys.executable, '-m', 'open_clip_rank.rank', '--model', 'tiny-rn-ordinal', '--device', 'cpu',
           '--no-progress', *args]
    env = subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(TEST_CONFIG_DIR))
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
def test_ordinal_model_learns_to_rank_held_out_images(ordinal_data, tmp_path):
    """From scratch (tiny ResNet tower, locked random text tower, learned prompts): held-out MAE by expectation
    well below that of always predicting the training median (README: the measured factor)."""
    result = _train(['--train-data', ordinal_data['train_csv'], '--val-data', ordinal_data['val_list'],
                     '--image-root', ordinal_data['root'], '--epochs', '6', '--batch-size', '16', '--lock-text',
                     '--save-frequency', '6', '--precision', 'fp32'], tmp_path, 'learn')
    assert result.returncode == 0, result.stderr[-3000:]
    results = _results(tmp_path, 'learn')
    final = results[-1]
    for metric in ('mae_exp', 'acc_exp', 'mae_max', 'acc_max', 'ordinality'):
        assert metric in final
    labels = np.repeat(np.arange(NUM_RANKS), 10)
    median_mae = np.abs(labels - np.median(np.repeat(np.arange(NUM_RANKS), 32))).mean()  # 1.5
    assert final['mae_exp'] <= 0.5 * median_mae, results
    assert results[0]['mae_exp'] > final['mae_exp']
    plots = tmp_path / 'logs' / 'learn' / 'plots'
    assert (plots / 'epoch_6_prototype_similarity.png').stat().st_size > 1000
    assert (plots / 'epoch_6_predicted_vs_true.png').stat().st_size > 1000

    # the rank CLI on the trained checkpoint: same predictions as validation, metrics, pictures, prototypes
    checkpoint = tmp_path / 'logs' / 'learn' / 'checkpoints' / 'epoch_6.pt'
    out = tmp_path / 'ranked'
    ranked = _rank(['--checkpoint-path', str(checkpoint), '--csv', ordinal_data['val_csv'], '--output-path', str(out),
                    '--probabilities', '--plots', str(tmp_path / 'pictures'),
                    '--export-prototypes', str(tmp_path / 'protos.pt')])
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    report = json.loads(out.with_suffix('.json').read_text())
    assert report['metrics']['mae_exp'] == pytest.approx(final['mae_exp'], abs=1e-4)
    assert report['metrics']['acc_max'] == pytest.approx(final['acc_max'], abs=1e-4)
    assert len(report['probabilities']) == NUM_RANKS * 10
    assert sum(report['probabilities'][0]['probs']) == pytest.approx(1.0, abs=1e-4)
    assert 'mae_exp' in ranked.stdout
    for picture in ('prototype_similarity.png', 'predicted_vs_true.png'):
        assert (tmp_path / 'pictures' / picture).is_file()
    with open(out.with_suffix('.csv')) as f:
        rows = list(csv.DictReader(f))
    assert {'expected_rank', 'predicted_rank', 'target'} <= set(rows[0])
    assert rows[0]['rank'] == '1' and float(rows[0]['score']) >= float(rows[-1]['score'])

    frozen = _rank(['--checkpoint-path', str(checkpoint), '--csv', ordinal_data['val_csv'],
                    '--output-path', str(tmp_path / 'frozen'), '--prototypes', str(tmp_path / 'protos.pt')])
    assert frozen.returncode == 0, frozen.stderr[-3000:]
    assert (tmp_path / 'frozen.csv').read_text() == out.with_suffix('.csv').read_text()

    folder = _rank(['--checkpoint-path', str(checkpoint), '--images', str(Path(ordinal_data['root']) / 'images'),
                    '--output-path', str(tmp_path / 'folder')])  # no --prompt: the prompts are learned
    assert folder.returncode == 0, folder.stderr[-3000:]
    with open(tmp_path / 'folder.csv') as f:
        ranked_rows = list(csv.DictReader(f))
    assert len(ranked_rows) == ordinal_data['num_train'] + ordinal_data['num_val']
    assert all(0 <= float(r['expected_rank']) <= NUM_RANKS - 1 for r in ranked_rows)


@pytest.mark.e2e
def test_accumulation_bf16_and_resume(small_data, tmp_path):
    common = ['--train-data', small_data['train_list'], '--image-root', small_data['root'], '--val-data',
              small_data['val_csv'], '--accum-freq', '2', '--lock-text', '--save-frequency', '1', '--warmup', '0']
    first = _train([*common, '--epochs', '1', '--precision', 'amp_bf16'], tmp_path, 'first')
    assert first.returncode == 0, first.stderr[-3000:]
    log = (tmp_path / 'logs' / 'first' / 'out.log').read_text()
    assert 'Ordinal_ce_loss' in log and 'Ordinal_kl_loss' in log
    assert 'Ordinal training data: 24 images, 6 ranks, 3 batches of 8' in log
    checkpoint = tmp_path / 'logs' / 'first' / 'checkpoints' / 'epoch_1.pt'
    resumed = _train([*common, '--epochs', '2', '--resume', str(checkpoint)], tmp_path, 'resumed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / 'logs' / 'resumed' / 'out.log').read_text()
    assert 'Start epoch 1' in log and 'Start epoch 0' not in log
    assert [r['epoch'] for r in _results(tmp_path, 'resumed')] == [2]


@pytest.mark.e2e
@pytest.mark.distributed
def test_two_process_torchrun(small_data, tmp_path):
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '-m', 'open_clip_train.main')
    result = _train(['--train-data', small_data['train_csv'], '--epochs', '1', '--dist-backend', 'gloo', '--warmup', '0'],
                    tmp_path, 'ddp', launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / 'logs' / 'ddp' / 'out.log').read_text()
    assert '1 batches of 8 per process' in log  # 24 images / (8 x 2 processes), last partial batch dropped


@pytest.mark.unit
@pytest.mark.parametrize('content, message', [
    ('filepath\tvalue\n{image}\t6\n', r"row 2: label 6 is outside \[0, 6\)"),
    ('{image} x\n', r"line 1: label 'x' is not an integer"),
])
def test_bad_labels_stop_before_training_with_one_line(small_data, tmp_path, content, message):
    bad = tmp_path / 'bad.txt'
    bad.write_text(content.format(image=Path(small_data['root']) / 'images' / 'train_00_000.png'))
    result = _train(['--train-data', str(bad), '--epochs', '1', '--batch-size', '1'], tmp_path, 'bad', in_process=True)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith('open_clip_rank: error:')]
    assert len(errors) == 1 and re.search(message, errors[0]), result.stderr[-2000:]
    assert 'Start epoch' not in result.stderr


@pytest.mark.unit
def test_ordinal_model_without_ordinal_data_is_a_usage_error(small_data, tmp_path):
    result = _train(['--train-data', small_data['train_csv'], '--csv-dataset-sample-type', 'default', '--epochs', '1'],
                    tmp_path, 'nodata', in_process=True)
    assert result.returncode != 0
    assert '--csv-dataset-sample-type ordinal' in result.stderr
