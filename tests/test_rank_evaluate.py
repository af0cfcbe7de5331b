"""Evaluating checkpoints on held-out splits (issue #21): ``python -m open_clip_rank.evaluate`` writes, per checkpoint
and dataset, the rank CLI's own metrics JSON and a summary table; the rank CLI's metrics equal validation's at the
same precision for ordinal models too (the adapter's: tests/test_rank_cli_hostile.py)."""
import argparse
import csv
import json
from pathlib import Path

import open_clip
import pytest
import torch
from helpers import call_main, write_rank_csv

from open_clip_rank import evaluate
from open_clip_rank import rank as rank_cli

pytestmark = pytest.mark.unit

MODEL = 'tiny-vit-adapter'
ORDINAL = 'tiny-rn-ordinal'
COMMON = ['--device', 'cpu', '--no-progress', '--workers', '0', '--batch-size', '8']


def _checkpoint(model_name, path, seed):
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save({'epoch': 1, 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
    return str(path)


@pytest.fixture(scope='module')
def rank_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('evaluate')
    data = root / 'data'
    data.mkdir()
    write_rank_csv(str(data), kinds=('circle', 'square'), counts=range(4), per_count=2, seed=1, name='shapes.csv')
    write_rank_csv(str(data), kinds=('circle',), counts=range(5), per_count=2, seed=2, name='circles.csv')
    (data / 'notes.md').write_text('not a dataset')
    checkpoints = [_checkpoint(MODEL, root / 'run-a' / 'checkpoints' / 'epoch_1.pt', 0),
                   _checkpoint(MODEL, root / 'run-b' / 'checkpoints' / 'epoch_1.pt', 1)]
    return {'root': root, 'data': data, 'checkpoints': checkpoints}


def _rank_json(model, checkpoint, csv_path, out, *extra):
    result = call_main(rank_cli.main, ['--model', model, '--checkpoint-path', checkpoint, '--csv', csv_path,
                                       '--output-path', out, *COMMON, *extra])
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(Path(out).with_suffix('.json').read_text())


def _summary(path):
    with open(path, newline='') as f:
        return list(csv.DictReader(f))


def test_two_checkpoints_on_two_datasets_write_the_rank_clis_json_and_a_summary(rank_setup, tmp_path):
    out = tmp_path / 'bench'
    result = call_main(evaluate.main, ['--data', rank_setup['data'], '--model', MODEL, '--checkpoint-path',
                                       *rank_setup['checkpoints'], '--output-dir', out, *COMMON])
    assert result.returncode == 0, result.stderr[-2000:]
    labels = ['run-a-epoch_1', 'run-b-epoch_1']  # same file names: the run folder tells them apart
    assert sorted(p.name for p in out.iterdir()) == sorted([*labels, 'checkpoints.json', 'summary.csv'])
    sources = json.loads((out / 'checkpoints.json').read_text())
    assert [sources[label]['checkpoint'] for label in labels] == rank_setup['checkpoints']
    rows = _summary(out / 'summary.csv')
    assert [(r['dataset'], r['checkpoint']) for r in rows] == [
        ('circles', labels[0]), ('circles', labels[1]), ('shapes', labels[0]), ('shapes', labels[1])]
    for label, checkpoint in zip(labels, rank_setup['checkpoints'], strict=True):
        for dataset in ('circles', 'shapes'):
            written = json.loads((out / label / f'{dataset}.json').read_text())
            expected = _rank_json(MODEL, checkpoint, rank_setup['data'] / f'{dataset}.csv',
                                  tmp_path / f'{label}-{dataset}')
            assert written == expected  # the rank CLI's JSON, every metric and count
            assert (out / label / f'{dataset}.csv').read_text() == (tmp_path / f'{label}-{dataset}.csv').read_text()
            row = next(r for r in rows if r['checkpoint'] == label and r['dataset'] == dataset)
            for metric in ('srcc', 'krcc', 'plcc', 'mae', 'pair_acc', 'pair_acc_official'):
                value = expected['metrics'][metric]
                assert (row[metric] == '') if value is None else float(row[metric]) == pytest.approx(value), metric
            assert int(row['num_ranked']) == expected['num_ranked'] and row['precision'] == 'fp32'
            assert row['model'] == MODEL and row['checkpoint_path'] == checkpoint
    assert 'circle/srcc' not in rows[0]  # per-category metrics stay in the JSON files
    header = result.stdout.splitlines()[-6]  # the printed table: header, rule, four rows
    assert header.split()[:4] == ['checkpoint', 'dataset', 'srcc', 'krcc']

    # a later run into the same folder adds its rows: one table over every checkpoint evaluated there
    again = call_main(evaluate.main, ['--data', rank_setup['data'] / 'circles.csv', '--model', MODEL,
                                      '--checkpoint-path', rank_setup['checkpoints'][0], '--output-dir', out,
                                      '--precision', 'amp', *COMMON])
    assert again.returncode == 0, again.stderr[-2000:]
    rows = _summary(out / 'summary.csv')
    assert [(r['dataset'], r['checkpoint'], r['precision']) for r in rows] == [
        ('circles', 'epoch_1', 'amp'), ('circles', labels[0], 'fp32'), ('circles', labels[1], 'fp32'),
        ('shapes', labels[0], 'fp32'), ('shapes', labels[1], 'fp32')]


def test_ordinal_checkpoints_get_their_own_metrics_from_csvs_and_list_files(tmp_path):
    from open_clip_rank.synthetic.ordinal import make_ordinal_dataset
    data = make_ordinal_dataset(tmp_path / 'ord', num_ranks=6, train_per_rank=1, val_per_rank=2, image_size=32)
    checkpoint = _checkpoint(ORDINAL, tmp_path / 'ordinal.pt', 0)
    out = tmp_path / 'csv'
    result = call_main(evaluate.main, ['--data', data['val_csv'], '--model', ORDINAL, '--checkpoint-path', checkpoint,
                                       '--output-dir', out, *COMMON])
    assert result.returncode == 0, result.stderr[-2000:]
    expected = _rank_json(ORDINAL, checkpoint, data['val_csv'], tmp_path / 'ref')
    assert json.loads((out / 'ordinal' / 'val.json').read_text()) == expected
    both = call_main(evaluate.main, ['--data', data['val_csv'], '--data', data['val_list'], '--model', ORDINAL,
                                     '--checkpoint-path', checkpoint, '--output-dir', tmp_path / 'x', *COMMON])
    assert both.returncode == 2 and 'two datasets named val' in both.stderr
    out = tmp_path / 'bench'
    result = call_main(evaluate.main, ['--data', data['val_list'], '--model', ORDINAL, '--checkpoint-path', checkpoint,
                                       '--output-dir', out, '--image-root', data['root'], *COMMON])
    assert result.returncode == 0, result.stderr[-2000:]
    expected = _rank_json(ORDINAL, checkpoint, data['val_csv'], tmp_path / 'ref')
    assert json.loads((out / 'ordinal' / 'val.json').read_text())['metrics'] == expected['metrics']
    row, = _summary(out / 'summary.csv')
    assert float(row['mae_exp']) == pytest.approx(expected['metrics']['mae_exp'])
    assert float(row['ordinality']) == pytest.approx(expected['ordinality'])


@pytest.mark.parametrize('argv, message', [
    (['--csv', 'x.csv'], '--csv: set by this command'),
    (['--output-path', 'o'], '--output-path: set by this command'),
    (['--prompt', 'Rank the x.'], '--prompt: set by this command'),
    ([], None),
])
def test_refusals_are_one_line(rank_setup, tmp_path, argv, message):
    base = ['--data', rank_setup['data'], '--model', MODEL, '--checkpoint-path', rank_setup['checkpoints'][0],
            '--output-dir', tmp_path / 'o', *COMMON]
    if message is None:  # the other refusals, on the same base
        for extra, expected in ((['--data', tmp_path / 'missing'], 'no such file or folder'),
                                (['--data', str(tmp_path / '*.csv')], 'no data files'),
                                (['--checkpoint-path', tmp_path / 'none.pt'], 'none.pt does not exist'),
                                (['--checkpoint-path', rank_setup['checkpoints'][0]], 'given twice')):
            result = call_main(evaluate.main, [*base, *extra])
            assert result.returncode == 2 and expected in result.stderr, (extra, result.stderr)
            assert len(result.stderr.strip().splitlines()) == 1
        no_model = call_main(evaluate.main, ['--data', rank_setup['data'], '--output-dir', tmp_path / 'o'])
        assert no_model.returncode == 2 and 'exactly one of a model name' in no_model.stderr
        assert not (tmp_path / 'o').exists()
        return
    result = call_main(evaluate.main, [*base, *argv])
    assert result.returncode == 2 and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_checkpoint_labels_tell_checkpoints_apart():
    template = argparse.Namespace(model='hf-hub:org/model', config_path=None)
    assert evaluate.checkpoint_labels(['/r/a/checkpoints/epoch_best.pt', '/r/a/checkpoints/epoch_10.pt'],
                                      template) == ['epoch_best', 'epoch_10']
    assert evaluate.checkpoint_labels(['/x/a/checkpoints/epoch_2.pt', '/x/b/checkpoints/epoch_2.pt'],
                                      template) == ['a-epoch_2', 'b-epoch_2']
    assert evaluate.checkpoint_labels(['/x/a/epoch_2.pt', '/y/a/epoch_2.pt'], template) == ['x-a-epoch_2',
                                                                                           'y-a-epoch_2']
    assert evaluate.checkpoint_labels([None], template) == ['hf-hub-org-model']


# --- the rank CLI on a held-out split equals validation at the same precision: ordinal models --------------------

def _ordinal_validation_args(data, tmp_path, precision):
    from open_clip_rank.integration.flags import plugin_parser
    defaults = vars(plugin_parser().parse_args([]))
    return argparse.Namespace(**{**defaults, 'model': ORDINAL, 'csv_dataset_sample_type': 'ordinal',
                                 'train_data': None, 'val_data': data['val_csv'], 'csv_img_key': 'filepath',
                                 'csv_value_key': 'value', 'csv_separator': '\t', 'batch_size': 8, 'seed': 0, 'rank': 0,
                                 'world_size': 1, 'workers': 0, 'distributed': False, 'horovod': False,
                                 'local_rank': 0, 'device': 'cpu', 'precision': precision, 'val_frequency': 1,
                                 'epochs': 1, 'save_logs': True, 'checkpoint_path': str(tmp_path), 'wandb': False,
                                 'dataset_type': 'csv'})


@pytest.mark.parametrize('precision', ['amp', 'fp32'])
def test_ordinal_cli_metrics_equal_validation_at_the_same_precision(tmp_path, precision):
    from open_clip_rank.data.ordinal import get_ordinal_data
    from open_clip_rank.evaluation.validation import evaluate_ranking
    from open_clip_rank.inference import load_rank_model
    from open_clip_rank.synthetic.ordinal import make_ordinal_dataset
    data = make_ordinal_dataset(tmp_path / 'ord', num_ranks=6, train_per_rank=1, val_per_rank=3, image_size=32)
    checkpoint = _checkpoint(ORDINAL, tmp_path / 'epoch_1.pt', 3)
    model, _, _ = load_rank_model(ORDINAL, checkpoint_path=checkpoint, device='cpu')  # fp32 weights, as in training
    args = _ordinal_validation_args(data, tmp_path, precision)
    _, _, preprocess = open_clip.create_model_and_transforms(ORDINAL)
    validation = evaluate_ranking(model, get_ordinal_data(args, (None, preprocess)), 1, args)
    assert validation['precision'] == precision
    report = _rank_json(ORDINAL, checkpoint, data['val_csv'], tmp_path / 'ranked', '--precision', precision)
    assert report['precision'] == precision
    assert {'mae_exp', 'acc_exp', 'mae_max', 'acc_max'} <= set(report['metrics']) <= set(validation)
    for key, value in report['metrics'].items():
        assert value == pytest.approx(validation[key], abs=1e-6), key
    assert report['ordinality'] == pytest.approx(validation['ordinality'], abs=1e-6)
