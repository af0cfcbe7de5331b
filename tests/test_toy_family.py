"""A family, a loss and a sample type defined only under tests/ (tests/toy_family/toy_rank_family/) and registered
from there through the ``open_clip_rank.plugins`` entry point: flags, start checks, make_shards, OpenCLIP's own
training loop, validation, checkpoints and the rank CLI all reach it through the registry, with no edit to the
package."""
import argparse
import csv
import importlib.metadata
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

from helpers import call_main, run, subprocess_env

TOY_DIR = Path(__file__).resolve().parent / 'toy_family'


@pytest.fixture
def toy_registered(monkeypatch):
    """The toy plugin registered in this process, the tables restored afterwards (other tests see no toy)."""
    from open_clip_rank import registry
    monkeypatch.syspath_prepend(str(TOY_DIR))
    for table in ('FAMILIES', 'LOSSES', 'SAMPLE_TYPES'):
        monkeypatch.setattr(registry, table, dict(getattr(registry, table)))
    monkeypatch.setattr(registry, 'CONFIG_DIRS', list(registry.CONFIG_DIRS))
    import toy_rank_family
    from toy_rank_family import family
    toy_rank_family.register()
    return family


@pytest.mark.unit
def test_the_entry_point_is_found_on_the_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TOY_DIR))
    names = {e.name: e.value for e in importlib.metadata.entry_points(group='open_clip_rank.plugins')}
    assert names.get('toy') == 'toy_rank_family:register'


@pytest.mark.unit
def test_its_flags_choices_and_checks_come_through_the_registry(toy_registered):
    from open_clip_rank.integration.flags import check_plugin_args, plugin_parser
    parser = plugin_parser()
    options = {o for action in parser._actions for o in action.option_strings}
    assert {'--toy-loss-weight', '--toy-value-scale'} <= options
    args, _ = parser.parse_known_args(['--csv-dataset-sample-type', 'toy', '--loss-opt', 'toy-mse'])
    assert args.csv_dataset_sample_type == 'toy' and args.loss_opt == 'toy-mse'
    base = dict(vars(args), model='tiny-vit-toy', train_data='x.csv', dataset_type='csv', accum_freq=1)
    check_plugin_args(argparse.Namespace(**base))  # nothing to refuse
    with pytest.raises(ValueError, match='--toy-loss-weight must be > 0'):
        check_plugin_args(argparse.Namespace(**{**base, 'toy_loss_weight': 0.0}))
    with pytest.raises(ValueError, match='--csv-dataset-sample-type toy'):  # its loss trains on its sample type
        check_plugin_args(argparse.Namespace(**{**base, 'csv_dataset_sample_type': 'default'}))


@pytest.mark.unit
def test_make_shards_writes_its_records(toy_registered, tmp_path):
    from open_clip_rank.make_shards import main
    data = toy_registered.make_brightness_dataset(tmp_path / 'data', num_train=6, num_val=2)
    result = call_main(main, [data['train'], tmp_path / 'shards', '--sample-type', 'toy', '--shard-size', '4',
                              '--no-progress'])
    assert result.returncode == 0, result.stderr
    with tarfile.open(tmp_path / 'shards' / '000000.tar') as tar:
        metas = [json.loads(tar.extractfile(m).read()) for m in tar if m.name.endswith('.json')]
    assert len(metas) == 4 and all(set(m) == {'value', 'source_path'} for m in metas)  # and where it came from


@pytest.mark.e2e
def test_trains_validates_saves_reloads_and_ranks(tmp_path, monkeypatch):
    """OpenCLIP's main trains the toy family from scratch (its loss, its data, its validation), saves checkpoints,
    and the rank CLI reloads the last one and reports the same held-out SRCC. The child processes find the plugin
    through its entry point alone (tests/toy_family on PYTHONPATH)."""
    monkeypatch.syspath_prepend(str(TOY_DIR))  # this process only imports its data generator (no registration)
    from toy_rank_family.family import make_brightness_dataset
    data = make_brightness_dataset(tmp_path / 'data')
    env = subprocess_env(PYTHONPATH=os.pathsep.join(p for p in (str(TOY_DIR), os.environ.get('PYTHONPATH')) if p))
    epochs = 8
    argv = ['--model', 'tiny-vit-toy', '--dataset-type', 'csv', '--csv-dataset-sample-type', 'toy',
            '--train-data', data['train'], '--val-data', data['val'], '--batch-size', '16', '--epochs', epochs,
            '--lr', '3e-3', '--warmup', '4', '--workers', '0', '--seed', '0', '--precision', 'fp32',
            '--logs', tmp_path / 'logs', '--name', 'toy', '--toy-loss-weight', '2']
    result = run([sys.executable, '-m', 'open_clip_train.main', *map(str, argv)], env, cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / 'logs' / 'toy' / 'out.log').read_text()
    assert 'Toy_mse_loss' in log  # its loss, named by its output dict
    results = [json.loads(line) for line in (tmp_path / 'logs' / 'toy' / 'checkpoints' / 'results.jsonl').open()]
    assert [r['epoch'] for r in results] == list(range(1, epochs + 1))
    final = results[-1]['toy_srcc']
    assert final >= 0.9 and final > results[0]['toy_srcc'] + 0.1, results  # held-out images ordered by brightness
    checkpoint = tmp_path / 'logs' / 'toy' / 'checkpoints' / f'epoch_{epochs}.pt'
    out = tmp_path / 'ranked' / 'val'
    ranked = run([sys.executable, '-m', 'open_clip_rank.rank', '--model', 'tiny-vit-toy', '--checkpoint-path',
                  str(checkpoint), '--csv', str(data['val']), '--output-path', str(out), '--no-progress',
                  '--device', 'cpu'], env)
    assert ranked.returncode == 0, ranked.stderr[-3000:]
    report = json.loads(out.with_suffix('.json').read_text())
    assert report['metrics']['toy_srcc'] == pytest.approx(final, abs=1e-4)
    rows = list(csv.DictReader(out.with_suffix('.csv').open()))
    assert [int(r['rank']) for r in rows] == list(range(1, len(rows) + 1))
    assert float(rows[0]['score']) >= float(rows[-1]['score']) and len(rows) == 48
