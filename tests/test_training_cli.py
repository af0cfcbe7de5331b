"""End-to-end: OpenCLIP's own training entry point trains and evaluates rank adapters."""
import json
import os
import sys
from pathlib import Path

import pytest

from helpers import run_openclip_main, write_rank_csv


@pytest.fixture(scope='module')
def rank_csvs(tmp_path_factory):
    root = tmp_path_factory.mktemp('rankdata')
    train = write_rank_csv(str(root), per_count=4, name='train.csv', weights=True)
    val = write_rank_csv(str(root), per_count=1, seed=1, name='val.csv')
    return train, val


def _train(args, logs, name, launcher=None, timeout=300, in_process=False):
    # no --logs flag: torchrun's own parser rejects it as an ambiguous prefix of its --logs-specs, so
    # runs use OpenCLIP's default ./logs inside ``logs``
    argv = ['--model', 'tiny-vit-adapter', '--dataset-type', 'csv', '--csv-dataset-sample-type', 'rank',
            '--batch-size', '8', '--lr', '1e-3', '--warmup', '2', '--workers', '1', '--seed', '0',
            '--name', name, '--log-every-n-steps', '1', *args]
    return run_openclip_main(argv, logs, launcher, in_process, timeout)


def _results(logs, name):
    lines = (Path(logs) / 'logs' / name / 'checkpoints' / 'results.jsonl').read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.e2e
def test_train_with_accumulation_evaluate_and_resume(rank_csvs, tmp_path):
    train, val = rank_csvs
    common = ['--train-data', train, '--val-data', val, '--epochs', '2', '--accum-freq', '2',
              '--loss-opt', 'dual-head', '--loss-components', 'regression', 'rank', '--negative-ratio', '0.25',
              '--lock-image', '--lock-text', '--grad-clip-norm', '1.0', '--save-frequency', '1']
    result = _train([*common, '--grad-checkpointing'], tmp_path, 'run')
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / 'logs' / 'run' / 'out.log').read_text()
    assert 'Regression_loss' in log and 'Rank_loss' in log
    assert 'Rank training data: 48 rows, 2 categories, 6 batches of 8 per process' in log
    # the seed's --lock-image --lock-text reach the model through OpenCLIP's main: the original trainable set,
    # one line per tower (the ViT's visual.proj, the text embeddings and ln_final keep training)
    import re
    for tower in ('Image', 'Text'):
        found = re.search(tower + r' tower locked \(as the original[^)]*\): ([\d,]+) of ([\d,]+) parameters', log)
        assert found, tower
        trainable, total = (int(v.replace(',', '')) for v in found.groups())
        assert 0 < trainable < total, (tower, trainable, total)
    results = _results(tmp_path, 'run')
    assert [r['epoch'] for r in results] == [1, 2]
    for metric in ('srcc', 'krcc', 'plcc', 'mae', 'pair_acc', 'circle/srcc', 'square/pair_acc'):
        assert metric in results[-1]
    assert results[-1]['num_samples'] == 12
    checkpoints = tmp_path / 'logs' / 'run' / 'checkpoints'
    assert (checkpoints / 'epoch_1.pt').is_file() and (checkpoints / 'epoch_2.pt').is_file()

    resumed = _train([*common, '--resume', str(checkpoints / 'epoch_1.pt'), '--precision', 'amp_bf16'],
                     tmp_path, 'resumed')
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / 'logs' / 'resumed' / 'out.log').read_text()
    assert 'Start epoch 1' in log and 'Start epoch 0' not in log
    assert [r['epoch'] for r in _results(tmp_path, 'resumed')] == [2]


@pytest.mark.e2e
@pytest.mark.distributed
def test_two_process_torchrun(rank_csvs, tmp_path):
    train, val = rank_csvs
    launcher = (sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node', '2', '--master_port', '29517',
                '-m', 'open_clip_train.main')
    result = _train(['--train-data', train, '--val-data', val, '--epochs', '1', '--dist-backend', 'gloo',
                     '--loss-opt', 'single-head', '--loss-components', 'rank', 'bce', '--negative-ratio', '0.25',
                     '--save-frequency', '1'], tmp_path, 'ddp', launcher=launcher)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / 'logs' / 'ddp' / 'out.log').read_text()
    assert 'world size 2' in log or 'world_size: 2' in log
    assert '3 batches of 8 per process' in log  # 48 rows / (8 x 2 processes)
    results = _results(tmp_path, 'ddp')
    assert len(results) == 1 and results[0]['num_samples'] == 12  # whole val set, evaluated once
    assert (tmp_path / 'logs' / 'ddp' / 'checkpoints' / 'epoch_1.pt').is_file()


@pytest.mark.unit
def test_bad_data_fails_before_training_with_one_line(tmp_path, rank_csvs):
    train, _ = rank_csvs
    bad = tmp_path / 'bad.csv'
    bad.write_text(Path(train).read_text().replace('value', 'score'))
    result = _train(['--train-data', str(bad), '--epochs', '1'], tmp_path, 'bad', in_process=True)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith('open_clip_rank: error:')]
    assert len(errors) == 1 and "no column 'value'" in errors[0] and '--csv-value-key' in errors[0]
    assert 'Start epoch' not in result.stdout + result.stderr


@pytest.mark.unit
def test_negative_ratio_out_of_range_is_a_usage_error(tmp_path, rank_csvs):
    result = _train(['--train-data', rank_csvs[0], '--negative-ratio', '1.5'], tmp_path, 'ratio', in_process=True)
    assert result.returncode == 2
    assert '--negative-ratio must be in [0, 1), got 1.5' in result.stderr
    assert not (tmp_path / 'logs' / 'ratio').exists()  # refused before OpenCLIP creates the experiment


# Zero-shot over OpenCLIP's 1000 ImageNet class names x 80 templates is ~30 s of text encoding on 2 CPU cores; the
# child process reads a sitecustomize that leaves 5 names (top-5 needs 5) and 2 templates. OpenCLIP's evaluation
# code itself runs unchanged.
FEWER_IMAGENET_CLASSES = """
import open_clip
open_clip.IMAGENET_CLASSNAMES = open_clip.IMAGENET_CLASSNAMES[:5]
open_clip.OPENAI_IMAGENET_TEMPLATES = open_clip.OPENAI_IMAGENET_TEMPLATES[:2]
"""


@pytest.mark.e2e
def test_zero_shot_imagenet_eval_on_a_rank_models_towers(rank_csvs, tmp_path, monkeypatch):
    """--imagenet-val during rank training: OpenCLIP's zero-shot runs on the towers (model(image=x))."""
    from PIL import Image
    site = tmp_path / 'site'
    site.mkdir()
    (site / 'sitecustomize.py').write_text(FEWER_IMAGENET_CLASSES)
    monkeypatch.setenv('PYTHONPATH', os.pathsep.join(filter(None, [str(site), os.environ.get('PYTHONPATH')])))
    folder = tmp_path / 'imagenet_val'
    for c, color in enumerate(((200, 30, 30), (30, 30, 200))):
        (folder / f'n0000000{c}').mkdir(parents=True)
        for k in range(3):
            Image.new('RGB', (32, 32), color).save(folder / f'n0000000{c}' / f'{k}.png')
    train, val = rank_csvs
    result = _train(['--train-data', train, '--val-data', val, '--epochs', '1', '--loss-opt', 'single-head',
                     '--imagenet-val', str(folder), '--zeroshot-frequency', '1'], tmp_path, 'zeroshot')
    assert result.returncode == 0, result.stderr[-3000:]
    results = _results(tmp_path, 'zeroshot')
    assert len(results) == 1  # one record per evaluation: ranking and zero-shot together
    record = results[0]
    assert record['epoch'] == 1 and 'srcc' in record
    assert 0.0 <= record['imagenet-zeroshot-val-top1'] <= 1.0 and 'imagenet-zeroshot-val-top5' in record
    log = (tmp_path / 'logs' / 'zeroshot' / 'out.log').read_text()
    assert 'imagenet-zeroshot-val-top1' in log
    assert record['imagenet-zeroshot-val-top5'] == 1.0  # 2 true classes among the 5 names: always in the top 5


SEED_COMMAND = ('--dataset-type csv --csv-dataset-sample-type rank --negative-ratio 0.2 --train-data {train} '
                '--warmup 10 --lr 5e-5 --wd 0.01 --lock-image --lock-text --epochs 2 '
                '--model convnext_large_d_320-adapter --pretrained laion2b_s29b_b131k_ft_soup '
                '--loss-opt dual-head --loss-components regression rank')


@pytest.mark.unit
def test_seed_training_command_parses_as_the_original(rank_csvs):
    """The README's copy of the original command (its --batch-size 5e-5 typo read as --lr) parses as intended."""
    import open_clip_train.params
    # the command's own data would fill its batch of 64; the test's 48 rows need a smaller one to pass the start checks
    args = open_clip_train.params.parse_args(SEED_COMMAND.format(train=rank_csvs[0]).split() + ['--batch-size', '16'])
    assert (args.model, args.pretrained, args.loss_opt) == ('convnext_large_d_320-adapter',
                                                            'laion2b_s29b_b131k_ft_soup', 'dual-head')
    assert args.loss_components == ['regression', 'rank'] and args.negative_ratio == 0.2 and args.lr == 5e-5
    assert args.lock_image and args.lock_text and args.csv_dataset_sample_type == 'rank'
    readme = (Path(__file__).resolve().parent.parent / 'README.md').read_text()
    assert 'python -m training.main \\\n' + ''.join(f'    {flag} \\\n' for flag in (
        '--dataset-type csv', '--csv-dataset-sample-type rank', '--negative-ratio 0.2')) in readme
