"""The best checkpoint, not only the last (issue #21): ``--rank-save-best METRIC`` keeps ``epoch_best.pt`` and
``best.json`` in the run's checkpoint folder after each validation that improves METRIC (the goal of each metric
declared by its sample type in the registry, OpenCLIP's own for image-caption validation and zero-shot), refuses
what could never keep anything, and ``--resume latest`` never takes ``epoch_best.pt`` for the newest."""
import argparse
import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from helpers import run_openclip_main, write_rank_csv

from open_clip_rank import registry
from open_clip_rank.files.best_checkpoint import (BEST_CHECKPOINT_NAME, BEST_KEY, BEST_RECORD_NAME, GOALS,
                                                  improves, read_best)
from open_clip_rank.integration import compat, hook
from open_clip_rank.integration.save_best import (OPENCLIP_VAL_GOALS, check_save_best_args, keep_best,
                                                  metric_goal)

TOY_DIR = Path(__file__).resolve().parent / 'toy_family'


def _save_checkpoint(path, epoch):
    from open_clip_rank.files.integrity import add_checksum
    torch.save(add_checksum({'epoch': epoch, 'state_dict': {'w': torch.full((2,), float(epoch))}}), path)


# --- --resume latest ---------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_resume_latest_never_takes_the_best_checkpoint(tmp_path, caplog):
    import open_clip_train.main as main_module
    folder = tmp_path / 'checkpoints'
    folder.mkdir()
    for epoch in (1, 2, 10):
        _save_checkpoint(folder / f'epoch_{epoch}.pt', epoch)
    _save_checkpoint(folder / BEST_CHECKPOINT_NAME, 2)
    original = compat.is_patched(main_module.get_latest_checkpoint) and main_module.get_latest_checkpoint.__wrapped__
    original = original or main_module.get_latest_checkpoint
    # OpenCLIP's natural sort puts 'epoch_best.pt' after every 'epoch_N.pt': it would resume from the best
    assert original(str(folder), remote=False) == str(folder / BEST_CHECKPOINT_NAME)
    compat.patch_training_main(hook.TRAINING_PACKAGES, 'get_latest_checkpoint', hook._latest_checkpoint)
    compat.patch_training_main(hook.TRAINING_PACKAGES, 'get_latest_checkpoint', hook._latest_checkpoint)  # once
    assert main_module.get_latest_checkpoint.__wrapped__ is original
    assert main_module.get_latest_checkpoint(str(folder), remote=False) == str(folder / 'epoch_10.pt')
    # the plugin's own fallback past damaged files leaves it out too
    from open_clip_rank.files.checkpoints import resume_candidates
    assert [Path(p).name for p in resume_candidates(folder / 'epoch_10.pt')] == ['epoch_2.pt', 'epoch_1.pt']
    for epoch in (1, 2, 10):
        (folder / f'epoch_{epoch}.pt').unlink()
    with caplog.at_level('WARNING'):
        assert main_module.get_latest_checkpoint(str(folder), remote=False) is None  # only the best: not the newest
    assert 'holds only epoch_best.pt' in caplog.text
    remote = hook._latest_checkpoint(lambda path, remote: f'{path}/{BEST_CHECKPOINT_NAME}', main_module)
    with pytest.raises(SystemExit, match='the best checkpoint .*--resume <remote>/epoch_N.pt'):
        remote('s3://bucket/run/checkpoints', True)


@pytest.mark.unit
def test_the_main_module_is_found_where_it_runs(monkeypatch):
    """``python -m open_clip_train.main`` runs it as ``__main__``: found by its spec, patched there."""
    import types
    fake = types.ModuleType('__main__')
    fake.__spec__ = types.SimpleNamespace(name='open_clip_train.main')
    fake.get_latest_checkpoint = lambda path, remote: None
    monkeypatch.setitem(sys.modules, '__main__', fake)
    assert fake in compat.training_main_modules(hook.TRAINING_PACKAGES)
    compat.patch_training_main(hook.TRAINING_PACKAGES, 'get_latest_checkpoint', hook._latest_checkpoint)
    assert compat.is_patched(fake.get_latest_checkpoint)
    del fake.get_latest_checkpoint
    with pytest.raises(compat.PatchPointMissing, match='open_clip_train.main.get_latest_checkpoint'):
        compat.patch_training_main(hook.TRAINING_PACKAGES, 'get_latest_checkpoint', hook._latest_checkpoint)


# --- the goals: declared per sample type, OpenCLIP's for its own evaluation ------------------------------------------

@pytest.mark.unit
def test_every_sample_type_declares_the_goal_of_the_metrics_its_validation_reports():
    from open_clip_rank.evaluation.metrics import METRIC_NAMES, ranking_metrics
    from open_clip_rank.evaluation.ordinal import ordinal_metrics
    rank, ordinal = registry.SAMPLE_TYPES['rank'].metric_goals, registry.SAMPLE_TYPES['ordinal'].metric_goals
    assert set(rank) == set(METRIC_NAMES) <= set(ranking_metrics([1.0, 2.0, 3.0], [1.0, 3.0, 2.0]))
    assert set(ordinal) == {*ordinal_metrics([1.0], [1], [1]), 'ordinality'}
    for goals in (rank, ordinal, OPENCLIP_VAL_GOALS):
        assert set(goals.values()) <= set(GOALS)
    assert [m for m, g in rank.items() if g == 'min'] == ['mae']
    assert [m for m, g in ordinal.items() if g == 'min'] == ['mae_exp', 'mae_max']
    assert metric_goal('circle/mae', 'rank') == ('min', 'val') and metric_goal('circle/srcc', 'rank') == ('max', 'val')
    assert metric_goal('mae_max', 'ordinal') == ('min', 'val') and metric_goal('mae', 'ordinal') == (None, None)
    assert metric_goal('imagenet-zeroshot-val-top1', 'rank') == ('max', 'imagenet_val')
    assert metric_goal('clip_val_loss', 'default') == ('min', 'val') and metric_goal('clip_val_loss', 'rank')[0] is None


@pytest.mark.unit
def test_openclips_own_metric_names_are_those_its_evaluation_returns():
    from open_clip_train.train import get_clip_metrics
    features = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    names = {*get_clip_metrics(features, features.flip(0), torch.tensor(10.0)), 'clip_val_loss',
             'val_generative_loss'}
    assert names == set(OPENCLIP_VAL_GOALS)
    assert {m for m, g in OPENCLIP_VAL_GOALS.items() if g == 'min'} == {
        'clip_val_loss', 'val_generative_loss', 'image_to_text_mean_rank', 'image_to_text_median_rank',
        'text_to_image_mean_rank', 'text_to_image_median_rank'}


@pytest.mark.unit
def test_improves():
    assert improves(0.5, None, 'max') and improves(0.5, float('nan'), 'min')
    assert improves(0.6, 0.5, 'max') and not improves(0.5, 0.5, 'max') and not improves(0.4, 0.5, 'max')
    assert improves(0.4, 0.5, 'min') and not improves(0.5, 0.5, 'min')
    assert not improves(float('nan'), 0.5, 'max') and not improves(float('inf'), None, 'max')
    with pytest.raises(ValueError):
        improves(1.0, 0.0, 'up')


# --- refusals ------------------------------------------------------------------------------------------------------

def _args(**overrides):
    base = dict(rank_save_best='srcc', csv_dataset_sample_type='rank', val_data='val.csv', train_data='train.csv',
                val_frequency=1, zeroshot_frequency=1, imagenet_val=None, imagenet_v2=None, logs='./logs/')
    return argparse.Namespace(**{**base, **overrides})


@pytest.mark.unit
@pytest.mark.parametrize('overrides, message', [
    ({'val_data': None}, '--rank-save-best srcc is a validation metric: add --val-data'),
    ({'rank_save_best': 'spearman'}, '--rank-save-best spearman is not a metric of --csv-dataset-sample-type rank '
                                     'or zero-shot ImageNet: give one of srcc, krcc, plcc, mae, pair_acc, '
                                     'pair_acc_official, imagenet-zeroshot-val-top1'),
    ({'rank_save_best': 'mae', 'csv_dataset_sample_type': 'ordinal'},
     'give one of mae_exp, acc_exp, mae_max, acc_max, ordinality, imagenet-zeroshot-val-top1'),
    ({'rank_save_best': 'srcc', 'csv_dataset_sample_type': 'default'},
     "not a metric of OpenCLIP's image-caption validation or zero-shot ImageNet: give one of clip_val_loss"),
    ({'val_frequency': 0}, '--val-frequency 0 never evaluates it'),
    ({'rank_save_best': 'imagenet-zeroshot-val-top1'}, 'is a zero-shot metric: add --imagenet-val'),
    ({'rank_save_best': 'imagenetv2-zeroshot-val-top5', 'imagenet_v2': 'v2', 'zeroshot_frequency': 0},
     '--zeroshot-frequency 0 never evaluates it'),
    ({'train_data': None}, 'keeps the best checkpoint of a training run: add --train-data'),
    ({'logs': 'none'}, '--logs none saves no checkpoint'),
    ({}, None),
    ({'rank_save_best': 'circle/pair_acc'}, None),
    ({'rank_save_best': 'mae_max', 'csv_dataset_sample_type': 'ordinal'}, None),
    ({'rank_save_best': 'clip_val_loss', 'csv_dataset_sample_type': 'default'}, None),
    ({'rank_save_best': 'imagenet-zeroshot-val-top1', 'val_data': None, 'imagenet_val': 'imagenet/val'}, None),
    ({'rank_save_best': None, 'val_data': None, 'train_data': None}, None),
])
def test_refusals_name_the_fix_in_one_line(overrides, message):
    args = _args(**overrides)
    if message is None:
        check_save_best_args(args)
        return
    with pytest.raises(ValueError) as err:
        check_save_best_args(args)
    assert message in str(err.value) and '\n' not in str(err.value)


@pytest.mark.unit
def test_refused_before_the_run_starts(tmp_path):
    """Through OpenCLIP's main: exit status 2 and the reason, before logs/<name> exists."""
    result = run_openclip_main(['--model', 'tiny-vit-adapter', '--dataset-type', 'csv', '--csv-dataset-sample-type',
                                'rank', '--train-data', 'train.csv', '--rank-save-best', 'srcc', '--name', 'x'],
                               tmp_path, in_process=True)
    assert result.returncode == 2
    assert 'open_clip_rank: error: --rank-save-best srcc is a validation metric: add --val-data' in result.stderr
    assert not (tmp_path / 'logs').exists()
    from open_clip_rank.integration.flags import plugin_parser
    text = plugin_parser().format_help()
    assert '--rank-save-best METRIC' in text and 'rank: srcc, krcc' in ' '.join(text.split())


@pytest.mark.unit
def test_a_plugin_sample_type_declares_its_own(monkeypatch):
    monkeypatch.syspath_prepend(str(TOY_DIR))
    for table in ('FAMILIES', 'LOSSES', 'SAMPLE_TYPES'):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    monkeypatch.setattr(registry, 'CONFIG_DIRS', list(registry.CONFIG_DIRS))
    import toy_rank_family
    toy_rank_family.register()
    check_save_best_args(_args(rank_save_best='toy_srcc', csv_dataset_sample_type='toy'))
    with pytest.raises(ValueError, match='give one of toy_srcc, imagenet'):
        check_save_best_args(_args(rank_save_best='srcc', csv_dataset_sample_type='toy'))


# --- keeping the best -----------------------------------------------------------------------------------------------

def _run(tmp_path, **overrides):
    from open_clip_rank.integration.run_state import start_run
    folder = tmp_path / 'checkpoints'
    folder.mkdir(exist_ok=True)
    args = argparse.Namespace(**{**vars(_args()), 'checkpoint_path': str(folder), 'save_logs': True, 'name': 'run',
                                 'precision': 'amp', **overrides})
    start_run(args)
    return args, folder


@pytest.fixture
def ended_run():
    yield
    from open_clip_rank.integration.run_state import end_run
    end_run()


@pytest.mark.unit
def test_an_ordinal_model_keeps_its_best_by_mae(tmp_path, ended_run, caplog):
    caplog.set_level('INFO')
    from open_clip_rank.files.checkpoints import unreadable_reason
    from open_clip_rank.files.integrity import CHECKSUM_KEY
    from open_clip_rank.inference import load_rank_model
    args, folder = _run(tmp_path, rank_save_best='mae_max', csv_dataset_sample_type='ordinal')
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-rn-ordinal')
    kept = {}
    for epoch, mae in ((1, 2.0), (2, 2.5), (3, 1.0), (4, float('nan')), (5, 1.0)):
        with torch.no_grad():
            next(model.parameters()).add_(1.0)  # other weights each epoch
        record = keep_best(model, {'epoch': epoch, 'mae_max': mae, 'acc_max': 0.1, 'precision': 'amp'}, epoch, args,
                           save=hook._save_into_run)
        if record is not None:
            kept[epoch] = {k: v.clone() for k, v in model.state_dict().items()}
    assert sorted(kept) == [1, 3]  # 2.5 and NaN do not improve; a tie keeps the earlier
    best = json.loads((folder / BEST_RECORD_NAME).read_text())
    assert best == {'metric': 'mae_max', 'goal': 'min', 'value': 1.0, 'epoch': 3, 'precision': 'amp',
                    'metrics': {'epoch': 3, 'mae_max': 1.0, 'acc_max': 0.1, 'precision': 'amp'},
                    'checkpoint': BEST_CHECKPOINT_NAME}
    path = folder / BEST_CHECKPOINT_NAME
    assert unreadable_reason(str(path)) is None  # verified like every run checkpoint
    checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    assert CHECKSUM_KEY in checkpoint and checkpoint['epoch'] == 3 and checkpoint['name'] == 'run'
    assert checkpoint[BEST_KEY] == {k: v for k, v in best.items() if k not in ('metrics', 'checkpoint')}
    assert not [p.name for p in folder.iterdir() if '.tmp-' in p.name]
    loaded, _, _ = load_rank_model('tiny-rn-ordinal', checkpoint_path=str(path), device='cpu')
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, kept[3][key]), key
    assert 'the best stays 1.0000 (epoch 3)' in caplog.text and 'is nan at epoch 4' in caplog.text


@pytest.mark.unit
def test_the_best_checkpoint_keeps_the_optimiser_and_the_amp_scaler(tmp_path, ended_run):
    from open_clip_rank.integration.run_state import current_run
    args, folder = _run(tmp_path)
    model = open_clip.create_model('tiny-vit-adapter')
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    scaler = torch.amp.GradScaler('cpu', init_scale=1024.0)
    current_run().note_optimizer(optimizer)
    current_run().note_scaler(scaler)  # what the train_one_epoch wrapper notes
    keep_best(model, {'srcc': 0.5}, 1, args, save=hook._save_into_run)
    checkpoint = torch.load(folder / BEST_CHECKPOINT_NAME, map_location='cpu', weights_only=True)
    assert checkpoint['scaler']['scale'] == 1024.0 and 'param_groups' in checkpoint['optimizer']


@pytest.mark.unit
def test_the_record_inside_the_checkpoint_wins_over_a_stale_json(tmp_path, ended_run):
    import os
    args, folder = _run(tmp_path)
    model = open_clip.create_model('tiny-vit-adapter')
    keep_best(model, {'srcc': 0.5}, 1, args, save=hook._save_into_run)
    (folder / BEST_RECORD_NAME).write_text(json.dumps({'metric': 'srcc', 'value': 0.1, 'epoch': 0}))
    stamp = os.stat(folder / BEST_CHECKPOINT_NAME).st_mtime_ns
    os.utime(folder / BEST_RECORD_NAME, ns=(stamp - 10**9, stamp - 10**9))  # the JSON older: its write was lost
    assert read_best(folder)['value'] == 0.5
    assert keep_best(model, {'srcc': 0.3}, 2, args, save=hook._save_into_run) is None  # 0.3 beats 0.1, not 0.5
    assert keep_best(model, {'srcc': 0.7}, 3, args, save=hook._save_into_run)['epoch'] == 3
    assert read_best(folder)['epoch'] == 3


@pytest.mark.unit
def test_plain_clip_models_keep_their_best_by_openclips_validation_loss(tmp_path, ended_run, caplog):
    """RankCLIP pretraining validates with OpenCLIP's own evaluate: the best by clip_val_loss (lower is better)."""
    args, folder = _run(tmp_path, rank_save_best='clip_val_loss', csv_dataset_sample_type='default')
    model = open_clip.create_model('tiny-vit')
    assert keep_best(model, {'clip_val_loss': 3.0, 'epoch': 1}, 1, args, save=hook._save_into_run)['epoch'] == 1
    assert keep_best(model, {'clip_val_loss': 3.5, 'epoch': 2}, 2, args, save=hook._save_into_run) is None
    assert keep_best(model, {'clip_val_loss': 2.0, 'epoch': 3}, 3, args, save=hook._save_into_run)['epoch'] == 3
    # zero-shot only this epoch (--zeroshot-frequency 1, --val-frequency 2): nothing to compare, nothing said
    assert keep_best(model, {'imagenet-zeroshot-val-top1': 0.1}, 4, args, save=hook._save_into_run) is None
    assert 'no best kept' not in caplog.text
    # a category the validation data does not have: said, once per validation
    args.rank_save_best, args.csv_dataset_sample_type = 'dog/srcc', 'rank'
    assert keep_best(model, {'srcc': 0.2, 'cat/srcc': 0.2}, 5, args, save=hook._save_into_run) is None
    assert '--rank-save-best dog/srcc: not among the metrics of epoch 5' in caplog.text
    args.save_logs = False  # not the process that writes checkpoints
    assert keep_best(model, {'dog/srcc': 0.9}, 6, args, save=hook._save_into_run) is None
    assert json.loads((folder / BEST_RECORD_NAME).read_text())['epoch'] == 3


# --- one run through OpenCLIP's main -----------------------------------------------------------------------------

@pytest.mark.e2e
def test_a_run_keeps_its_best_and_resume_latest_takes_the_newest(tmp_path):
    train = write_rank_csv(str(tmp_path), per_count=2, name='train.csv')
    val = write_rank_csv(str(tmp_path), per_count=1, seed=1, name='val.csv')
    argv = ['--model', 'tiny-vit-adapter', '--dataset-type', 'csv', '--csv-dataset-sample-type', 'rank',
            '--train-data', train, '--val-data', val, '--batch-size', '8', '--lr', '1e-2', '--warmup', '1',
            '--workers', '0', '--seed', '0', '--name', 'run', '--epochs', '3', '--save-frequency', '1',
            '--precision', 'fp32', '--rank-save-best', 'srcc']
    result = run_openclip_main(argv, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / 'logs' / 'run' / 'checkpoints'
    results = [json.loads(line) for line in (folder / 'results.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in results] == [1, 2, 3]
    values = [r['srcc'] if r['srcc'] is not None else math.nan for r in results]
    best_epoch = results[int(np.nanargmax(values))]['epoch']  # the first of equal values
    best = json.loads((folder / BEST_RECORD_NAME).read_text())
    assert (best['epoch'], best['metric'], best['goal']) == (best_epoch, 'srcc', 'max')
    assert best['value'] == pytest.approx(max(v for v in values if not math.isnan(v)), abs=1e-12)
    assert best['metrics']['srcc'] == best['value'] and best['precision'] == 'fp32'
    # epoch_best.pt holds the weights of that epoch's epoch_N.pt (and its optimiser state: it resumes too)
    kept = torch.load(folder / BEST_CHECKPOINT_NAME, map_location='cpu', weights_only=True)
    regular = torch.load(folder / f'epoch_{best_epoch}.pt', map_location='cpu', weights_only=True)
    assert kept['epoch'] == best_epoch and kept[BEST_KEY]['value'] == best['value']
    assert kept['state_dict'].keys() == regular['state_dict'].keys()
    assert all(torch.equal(kept['state_dict'][k], regular['state_dict'][k]) for k in regular['state_dict'])
    assert kept['optimizer']['param_groups'] == regular['optimizer']['param_groups']
    log = (tmp_path / 'logs' / 'run' / 'out.log').read_text()
    assert re.search(rf'--rank-save-best srcc: \S+ at epoch {best_epoch}.*: saved \S*epoch_best\.pt', log)

    resumed = run_openclip_main([*argv, '--resume', 'latest'], tmp_path)  # nothing left to train: loads and ends
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / 'logs' / 'run' / 'out.log').read_text()
    assert re.search(r"Found latest resume checkpoint at \S*epoch_3\.pt", log)
    assert re.search(r"=> resuming checkpoint '\S*epoch_3\.pt' \(epoch 3\)", log)
    assert 'epoch_best.pt' not in log[log.index('Found latest resume checkpoint'):]
