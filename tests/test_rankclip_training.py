"""RankCLIP pretraining from scratch through OpenCLIP's own entry point, on generated image-caption data."""
import re
import subprocess
import sys

import pytest

import open_clip
from open_clip_rank.synthetic.captions import make_caption_dataset, zero_shot_accuracy
from helpers import TEST_CONFIG_DIR, subprocess_env

pytestmark = pytest.mark.e2e

EPOCHS = 10


def test_rankclip_pretraining_learns_zero_shot_classification(tmp_path):
    data = make_caption_dataset(str(tmp_path / 'data'), train_per_class=40, val_per_class=10)
    cmd = [sys.executable, '-m', 'open_clip_train.main', '--model', 'tiny-vit', '--dataset-type', 'csv',
           '--train-data', data['train'], '--loss-opt', 'rankclip', '--epochs', str(EPOCHS),
           '--batch-size', '16', '--accum-freq', '2', '--lr', '2e-3', '--wd', '0.1', '--warmup', '10',
           '--workers', '1', '--seed', '0', '--save-frequency', str(EPOCHS), '--name', 'rankclip',
           '--log-every-n-steps', '5', '--report-to', 'tensorboard']
    result = subprocess.run(cmd, env=subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(TEST_CONFIG_DIR)),
                            cwd=str(tmp_path), capture_output=True, text=True, timeout=600)  # hang guard only
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / 'logs' / 'rankclip'
    log = (run / 'out.log').read_text()

    # the ramp follows OpenCLIP's 0-based epochs: weight 0 in the first epoch, the peak 2 from 2/3 on
    assert 'RankCLIP rank-loss weight 0 in epoch 0 (epoch 1 of 10' in log
    assert 'RankCLIP rank-loss weight 1 in epoch 3 (epoch 4 of 10' in log
    assert 'RankCLIP rank-loss weight 2 in epoch 9 (epoch 10 of 10' in log
    assert list(run.glob('tensorboard/events.out.tfevents.*'))
    # each term is its own loss entry; OpenCLIP's total is their sum
    line = [l for l in log.splitlines() if f'Train Epoch: {EPOCHS - 1} ' in l][-1]
    values = {name: float(v) for name, v in re.findall(r'(\w+_loss|Loss): ([\d.]+) ', line)}
    assert set(values) == {'Contrastive_loss', 'Crossmodal_rank_loss', 'Inmodal_rank_loss', 'Loss'}
    assert values['Crossmodal_rank_loss'] > 0 and values['Inmodal_rank_loss'] > 0
    assert abs(values['Contrastive_loss'] + values['Crossmodal_rank_loss'] + values['Inmodal_rank_loss']
               - values['Loss']) < 1e-3
    # the contrastive loss falls: epoch averages of the first and last epoch
    averages = {int(epoch): float(avg) for epoch, avg in
                re.findall(r'Train Epoch: (\d+) \[.*Contrastive_loss: [\d.]+ \(([\d.]+)\)', log)}
    assert averages[EPOCHS - 1] < averages[0] - 0.5, averages

    # zero-shot classification of held-out images from the saved checkpoint: 12 classes, chance 1/12
    model, _, preprocess = open_clip.create_model_and_transforms(
        'tiny-vit', pretrained=str(run / 'checkpoints' / f'epoch_{EPOCHS}.pt'))
    accuracy = zero_shot_accuracy(model, preprocess, open_clip.get_tokenizer('tiny-vit'), data['val'])
    assert accuracy > 0.3, accuracy
