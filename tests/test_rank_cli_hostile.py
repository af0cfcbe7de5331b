"""Damaged files and hostile inputs for the rank CLI, the Python API and evaluation (issue #19): nothing silent,
nothing lost, never a traceback. Non-finite scores, unwritable outputs, unusable devices, a prompt for a model
that takes none, low precision on every path, validation and the CLI at the same precision, metrics of
categories without pairs."""
import csv
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import open_clip
import pytest
import torch
from helpers import (
    TEST_CONFIG_DIR,
    call_main,
    make_unreadable_image,
    subprocess_env,
    write_rank_csv,
)
from scipy import stats

from open_clip_rank import inference
from open_clip_rank.inference import (
    NON_FINITE_CAUSE,
    load_rank_model,
    pairwise_scores,
    predict_images,
    rank_images,
    resolve_device,
    score_images,
    score_rows,
)
from open_clip_rank.rank import main

MODEL = 'tiny-vit-adapter'
ORDINAL = 'tiny-rn-ordinal'
PROMPT = 'Rank the numbers of circle.'


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('hostile')
    val_csv = write_rank_csv(str(root), counts=range(5), per_count=2, name='val.csv')
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    checkpoint = root / 'epoch_1.pt'
    torch.save({'epoch': 1, 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, checkpoint)
    nan_checkpoint = root / 'nan.pt'  # loads without error, every score NaN (a damaged or diverged checkpoint)
    torch.save({'epoch': 1, 'state_dict': {k: torch.full_like(v, float('nan')) if v.is_floating_point() else v
                                           for k, v in model.state_dict().items()}}, nan_checkpoint)
    folder = root / 'folder'
    folder.mkdir()
    paths = [line.split('\t')[0] for line in Path(val_csv).read_text().splitlines()[1:]]
    images = []
    for i, path in enumerate(paths[:8]):
        images.append(folder / f'img{i}.png')
        images[-1].write_bytes(Path(path).read_bytes())
    broken = root / 'broken'
    make_unreadable_image(broken / 'a.png')
    make_unreadable_image(broken / 'b.png')
    return {'root': root, 'val_csv': val_csv, 'checkpoint': checkpoint, 'nan_checkpoint': nan_checkpoint,
            'folder': folder, 'images': sorted(str(p) for p in images), 'broken': broken}


def _rank(setup, *args, model=MODEL, checkpoint=True):
    argv = ['--model', model, '--no-progress', '--device', 'cpu', *args]
    if checkpoint is True:
        argv += ['--checkpoint-path', setup['checkpoint']]
    elif checkpoint:
        argv += ['--checkpoint-path', checkpoint]
    return call_main(main, argv)


def _one_error_line(result, status=2):
    """A refusal: the given exit status, one 'open_clip_rank.rank: error:' line, no traceback."""
    assert result.returncode == status, (result.returncode, result.stderr[-2000:])
    errors = [line for line in result.stderr.splitlines() if 'error:' in line]
    assert len(errors) == 1 and errors[0].startswith('open_clip_rank.rank: error: '), result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    return errors[0]


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _poison(monkeypatch, model_class, method, indices, value, key=None):
    """``model_class.method`` with ``value`` written into the rows ``indices`` of its output (``key``: of that entry
    of its output dict): the model produces a non-finite value for those images."""
    original = getattr(model_class, method)

    def poisoned(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        target = out[key] if key else out
        if isinstance(target, tuple):
            target = target[0]
        for i in indices:
            if i < len(target):
                target[i] = value
        return out

    monkeypatch.setattr(model_class, method, poisoned)


# --- 1. non-finite scores are never ranked ----------------------------------------------------------------------

@pytest.mark.unit
def test_all_nan_scores_refuse_with_status_1_and_write_nothing(setup, tmp_path):
    for source in (['--images', setup['folder'], '--prompt', PROMPT], ['--csv', setup['val_csv']]):
        result = _rank(setup, *source, '--output-path', tmp_path / 'out', checkpoint=setup['nan_checkpoint'])
        line = _one_error_line(result, status=1)
        assert 'nothing could be ranked' in line and 'with non-finite predictions' in line
        assert 'score is nan' in line and 'damaged checkpoint' in line
    assert not list(tmp_path.iterdir())


@pytest.mark.unit
def test_all_unreadable_refuses_with_status_1(setup, tmp_path):
    result = _rank(setup, '--images', setup['broken'], '--prompt', PROMPT, '--output-path', tmp_path / 'out')
    line = _one_error_line(result, status=1)
    assert 'nothing could be ranked: all 2 image(s) were skipped (2 unreadable)' in line
    assert not list(tmp_path.iterdir())


@pytest.mark.unit
def test_some_non_finite_scores_are_skipped_with_the_reason(setup, tmp_path, monkeypatch):
    model, transform, tokenizer = load_rank_model(MODEL, checkpoint_path=str(setup['checkpoint']), device='cpu')
    images = setup['images']
    clean = rank_images(model, images, PROMPT, transform, tokenizer, batch_size=16)
    _poison(monkeypatch, type(model), 'score_tokens', (1, 2), float('nan'))
    _poison(monkeypatch, type(model), 'score_tokens', (2, 5), float('inf'))  # image 2: nan, then inf
    ranked = rank_images(model, images, PROMPT, transform, tokenizer, batch_size=16)
    assert [r['rank'] for r in ranked[:-3]] == list(range(1, len(images) - 2))
    skipped = {r['image']: r['skipped'] for r in ranked[-3:]}
    assert all(r['rank'] is None and r['score'] is None for r in ranked[-3:])
    assert skipped == {images[1]: f'score is nan: {NON_FINITE_CAUSE}', images[2]: f'score is inf: {NON_FINITE_CAUSE}',
                       images[5]: f'score is inf: {NON_FINITE_CAUSE}'}
    # the others keep their order
    assert [r['image'] for r in ranked[:-3]] == [r['image'] for r in clean if r['image'] not in skipped]
    scores, reasons = score_rows(model, images, [PROMPT] * len(images), transform, tokenizer, batch_size=16)
    assert [i for i, _ in reasons] == [1, 2, 5] and torch.isnan(scores[[1, 2, 5]]).all()
    assert torch.isfinite(scores[[0, 3, 4, 6, 7]]).all()

    # the CLI: listed as skipped (reason, no score, no rank), after the ranked rows; exit 0
    out = tmp_path / 'ranked'
    result = _rank(setup, '--images', setup['folder'], '--prompt', PROMPT, '--output-path', out, '--batch-size', '16')
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _read_csv(out.with_suffix('.csv'))
    bad = [r for r in rows if r['skipped']]
    assert sorted(r['image'] for r in bad) == sorted(skipped) and rows[-3:] == sorted(bad, key=rows.index)
    assert all(r['score'] == '' and r['rank'] == '' and NON_FINITE_CAUSE in r['skipped'] for r in bad)
    assert sorted(int(r['rank']) for r in rows if not r['skipped']) == list(range(1, len(images) - 2))
    report = json.loads(out.with_suffix('.json').read_text())
    assert report['num_ranked'] == len(images) - 3 and {s['image'] for s in report['skipped']} == set(skipped)


@pytest.mark.unit
def test_non_finite_pair_summaries_leave_the_others_pairwise_scores_finite(setup, monkeypatch):
    model, transform, tokenizer = load_rank_model(MODEL, checkpoint_path=str(setup['checkpoint']), device='cpu')
    images = setup['images']
    without, _ = pairwise_scores(model, images[:3] + images[4:], PROMPT, transform, tokenizer, batch_size=16)
    _poison(monkeypatch, type(model), 'pair_summaries', (3,), float('nan'))
    scores, skipped = pairwise_scores(model, images, PROMPT, transform, tokenizer, batch_size=16, block_size=3)
    assert skipped == [(3, f'pair summary is nan: {NON_FINITE_CAUSE}')]
    assert math.isnan(scores[3]) and torch.isfinite(scores[[0, 1, 2, 4, 5, 6, 7]]).all()
    torch.testing.assert_close(scores[[0, 1, 2, 4, 5, 6, 7]], without)  # the image takes no part


@pytest.mark.unit
def test_non_finite_predictions_of_learned_prompt_models_are_skipped(setup, monkeypatch):
    model, transform, _ = load_rank_model(ORDINAL, device='cpu', random_weights=True)
    _poison(monkeypatch, type(model), 'rank_predictions', (0,), float('nan'), key='expected_rank')
    outputs, skipped = predict_images(model, setup['images'], transform, batch_size=16)
    assert [i for i, _ in skipped] == [0]  # 'score' is the expected rank: the first prediction named
    assert skipped[0][1] in (f'{name} is nan: {NON_FINITE_CAUSE}' for name in ('score', 'expected_rank'))
    assert all(torch.isnan(values[0]).all() for values in outputs.values())
    assert all(torch.isfinite(values[1:]).all() for values in outputs.values())


@pytest.mark.unit
def test_ranks_skip_non_finite_rows():
    from open_clip_rank.rank import rank_within_prompts
    rows = [{'prompt': 'p', 'score': s} for s in (1.0, float('nan'), 3.0, float('inf'), None)]
    rank_within_prompts(rows)
    assert [r['rank'] for r in rows] == [2, None, 1, None, None]


# --- 2. unwritable outputs are refused before the model loads --------------------------------------------------

@pytest.fixture
def no_model(monkeypatch):
    """Loading a model fails the test: the refusal must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError('the model was loaded before the outputs were checked')
    monkeypatch.setattr(inference, 'load_rank_model', refuse)


@pytest.mark.unit
def test_outputs_under_a_file_or_onto_a_folder_are_refused_first(setup, tmp_path, no_model):
    a_file = tmp_path / 'a-file.txt'
    a_file.write_text('x')
    source = ['--images', setup['folder'], '--prompt', PROMPT]
    line = _one_error_line(_rank(setup, *source, '--output-path', a_file / 'sub' / 'out'))
    assert f'--output-path {a_file / "sub" / "out"}: {a_file} is a file, not a folder' in line
    line = _one_error_line(_rank(setup, *source, '--output-path', tmp_path / 'o', '--contact-sheet', tmp_path))
    assert f'--contact-sheet {tmp_path} is a folder' in line
    line = _one_error_line(_rank(setup, *source, '--output-path', tmp_path / 'o',
                                 '--export-prototypes', a_file / 'protos.pt'))
    assert '--export-prototypes' in line and 'is a file, not a folder' in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ['a-file.txt']


@pytest.mark.unit
def test_unwritable_output_folder_is_refused_first(setup, tmp_path, monkeypatch, no_model):
    import os
    locked = tmp_path / 'locked'
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root ignores permissions: make the probe write fail as it would
            real = tempfile.NamedTemporaryFile

            def denied(*args, dir=None, **kwargs):
                if str(dir).startswith(str(locked)):
                    raise PermissionError(13, 'Permission denied')
                return real(*args, dir=dir, **kwargs)
            monkeypatch.setattr(tempfile, 'NamedTemporaryFile', denied)
        source = ['--images', setup['folder'], '--prompt', PROMPT]
        for flags in (['--output-path', locked / 'new' / 'ranked'],
                      ['--output-path', tmp_path / 'o', '--contact-sheet', locked / 'sheet.png']):
            line = _one_error_line(_rank(setup, *source, *flags))
            assert f'cannot write in folder {locked} (PermissionError: Permission denied)' in line
            assert 'choose a writable folder' in line
        assert not list(locked.iterdir())
    finally:
        locked.chmod(0o700)


# --- 3. devices -------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_unusable_or_unknown_devices_are_one_line(setup, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    source = ['--images', setup['folder'], '--prompt', PROMPT, '--output-path', tmp_path / 'o']
    for device in ('cuda', 'cuda:1'):
        line = _one_error_line(call_main(main, ['--model', MODEL, '--checkpoint-path', setup['checkpoint'],
                                                '--device', device, *source]))
        assert f"device '{device}' was asked for, but torch sees no CUDA device" in line
        assert 'use --device cpu' in line and 'omit --device' in line
    line = _one_error_line(call_main(main, ['--model', MODEL, '--checkpoint-path', setup['checkpoint'],
                                            '--device', 'gpu0', *source]))
    assert "unknown device 'gpu0'" in line
    with pytest.raises(ValueError, match='torch sees no CUDA device'):
        load_rank_model(MODEL, checkpoint_path=str(setup['checkpoint']), device='cuda')
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 1)
    with pytest.raises(ValueError, match=r"'cuda:3' was asked for, but torch sees 1 CUDA device\(s\) \(cuda:0 to "
                                         r"cuda:0\)"):
        resolve_device('cuda:3')
    assert resolve_device('cpu') == torch.device('cpu')
    assert not list(tmp_path.iterdir())


# --- 4. a prompt for a model whose prompts are learned ---------------------------------------------------------

@pytest.mark.unit
def test_prompt_for_a_model_with_learned_prompts_is_refused(setup, tmp_path):
    result = call_main(main, ['--model', ORDINAL, '--random-weights', '--device', 'cpu', '--images', setup['folder'],
                              '--prompt', PROMPT, '--output-path', tmp_path / 'o', '--no-progress'])
    line = _one_error_line(result)
    assert 'models take no prompt' in line and 'rank without --prompt' in line
    assert not list(tmp_path.iterdir())
    model, transform, tokenizer = load_rank_model(ORDINAL, device='cpu', random_weights=True)
    assert not model.needs_prompt
    for call in (lambda: score_images(model, setup['images'], PROMPT, transform, tokenizer),
                 lambda: score_rows(model, setup['images'], [PROMPT] * 8, transform, tokenizer),
                 lambda: rank_images(model, setup['images'], PROMPT, transform, tokenizer),
                 lambda: predict_images(model, setup['images'], transform, prompt=PROMPT, tokenizer=tokenizer)):
        with pytest.raises(ValueError, match='take no prompt'):
            call()


# --- 5. low precision on every path ----------------------------------------------------------------------------

def _scores(path):
    return {(r['image'], r['prompt']): float(r['score']) for r in _read_csv(path) if r['score']}


@pytest.mark.unit
def test_bf16_cli_ranks_like_fp32_on_every_path(setup, tmp_path):
    runs = {}
    for precision in ('fp32', 'bf16'):
        out = tmp_path / f'csv-{precision}'
        result = _rank(setup, '--csv', setup['val_csv'], '--precision', precision, '--output-path', out)
        assert result.returncode == 0, result.stderr[-2000:]
        runs[precision] = _scores(out.with_suffix('.csv'))
        report = json.loads(out.with_suffix('.json').read_text())
        assert report['precision'] == precision and not report['skipped']
        out = tmp_path / f'folder-{precision}'
        result = _rank(setup, '--images', setup['folder'], '--prompt', PROMPT, '--pairwise', '--precision',
                       precision, '--output-path', out)
        assert result.returncode == 0, result.stderr[-2000:]
        rows = _read_csv(out.with_suffix('.csv'))
        assert all(math.isfinite(float(r['score'])) and math.isfinite(float(r['pairwise_score'])) for r in rows)
    keys = sorted(runs['fp32'])
    assert len(keys) == 20 and set(runs['bf16']) == set(keys)
    assert stats.spearmanr([runs['fp32'][k] for k in keys], [runs['bf16'][k] for k in keys]).statistic > 0.9


@pytest.mark.unit
def test_low_precision_python_api(setup):
    images = setup['images']
    reference, transform, tokenizer = load_rank_model(MODEL, checkpoint_path=str(setup['checkpoint']), device='cpu')
    expected, _ = score_images(reference, images, PROMPT, transform, tokenizer, batch_size=16)
    for precision in ('bf16', 'fp16', 'amp', 'amp_bf16'):  # fp16 matmuls run on the CPU in this torch
        model, transform, tokenizer = load_rank_model(MODEL, checkpoint_path=str(setup['checkpoint']),
                                                      device='cpu', precision=precision)
        scores, skipped = score_images(model, images, [PROMPT, 'Rank the numbers of square.'], transform, tokenizer,
                                       batch_size=16)
        assert not skipped and torch.isfinite(scores).all(), precision
        assert stats.spearmanr(scores[:, 0], expected[:, 0]).statistic > 0.9, precision
        rows, skipped = score_rows(model, images, [PROMPT] * len(images), transform, tokenizer, batch_size=16)
        assert not skipped and torch.isfinite(rows).all()
        torch.testing.assert_close(rows, scores[:, 0], rtol=0.05, atol=0.05)
        pair, skipped = pairwise_scores(model, images, PROMPT, transform, tokenizer, batch_size=16)
        assert not skipped and torch.isfinite(pair).all()
        assert [r['rank'] for r in rank_images(model, images, PROMPT, transform, tokenizer)] == list(range(1, 9))
    model, transform, _ = load_rank_model(ORDINAL, device='cpu', precision='bf16', random_weights=True)
    outputs, skipped = predict_images(model, images, transform)
    assert not skipped and all(torch.isfinite(v).all() for v in outputs.values())


@pytest.mark.unit
def test_bf16_with_exported_prototypes(setup, tmp_path):
    protos = tmp_path / 'protos.pt'
    first = call_main(main, ['--model', ORDINAL, '--random-weights', '--device', 'cpu', '--images', setup['folder'],
                             '--output-path', tmp_path / 'a', '--export-prototypes', protos, '--no-progress'])
    assert first.returncode == 0, first.stderr[-2000:]
    frozen = call_main(main, ['--model', ORDINAL, '--random-weights', '--device', 'cpu', '--images', setup['folder'],
                              '--output-path', tmp_path / 'b', '--prototypes', protos, '--precision', 'bf16',
                              '--no-progress'])
    assert frozen.returncode == 0, frozen.stderr[-2000:]
    rows = _read_csv(tmp_path / 'b.csv')
    assert len(rows) == 8 and all(math.isfinite(float(r['expected_rank'])) for r in rows)


@pytest.mark.unit
def test_unknown_or_uncastable_precision_is_one_line(setup):
    with pytest.raises(ValueError, match="unknown precision 'fp8'"):
        load_rank_model(MODEL, device='cpu', precision='fp8', random_weights=True)
    # OpenCLIP 3.3 cannot cast a text tower whose projection is a Linear (proj_bias) to bf16: refused, with the fix
    with pytest.raises(ValueError, match=r"cannot cast model tiny-customtext-adapter to bf16 .*amp_bf16") as err:
        load_rank_model('tiny-customtext-adapter', device='cpu', precision='bf16', random_weights=True)
    assert '\n' not in str(err.value)
    model, transform, tokenizer = load_rank_model('tiny-customtext-adapter', device='cpu', precision='amp_bf16',
                                                  random_weights=True)  # the fix works
    scores, skipped = score_images(model, setup['images'], PROMPT, transform, tokenizer)
    assert not skipped and torch.isfinite(scores).all()


# --- 6. validation and the CLI agree at the same precision -----------------------------------------------------

def _validation_args(setup, tmp_path, precision):
    return SimpleNamespace(model=MODEL, loss_opt=None, train_data=None, val_data=setup['val_csv'],
                           csv_img_key='filepath', csv_caption_key='title', csv_value_key='value',
                           csv_category_key='cname', csv_weight_key='w', csv_separator='\t', negative_ratio=0.0,
                           batch_size=8, seed=0, rank=0, world_size=1, workers=0, distributed=False, horovod=False,
                           local_rank=0, device='cpu', precision=precision, val_frequency=1, epochs=1, save_logs=True,
                           checkpoint_path=str(tmp_path), wandb=False)


@pytest.mark.unit
@pytest.mark.parametrize('precision', ['amp', 'amp_bf16', 'fp32'])
def test_cli_metrics_equal_validation_at_the_same_precision(setup, tmp_path, precision):
    from open_clip_rank.data.rank import get_rank_data
    from open_clip_rank.evaluation.validation import evaluate_ranking
    model, _, _ = load_rank_model(MODEL, checkpoint_path=str(setup['checkpoint']), device='cpu')  # fp32 weights
    args = _validation_args(setup, tmp_path, precision)
    _, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    data = get_rank_data(args, (None, preprocess), tokenizer=open_clip.get_tokenizer(MODEL))
    validation = evaluate_ranking(model, data, 1, args)
    assert validation['precision'] == precision
    logged = json.loads((tmp_path / 'results.jsonl').read_text())
    assert logged['precision'] == precision and logged['srcc'] == validation['srcc']

    out = tmp_path / 'ranked'
    result = _rank(setup, '--csv', setup['val_csv'], '--precision', precision, '--batch-size', '8',
                   '--output-path', out)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.with_suffix('.json').read_text())
    assert report['precision'] == precision
    metrics = report['metrics']
    assert set(metrics) <= set(validation)
    for key, value in metrics.items():
        assert value == pytest.approx(validation[key], abs=1e-6), key
    if precision == 'amp':  # autocast really ran: the scores are not fp32's
        fp32 = tmp_path / 'fp32'
        assert _rank(setup, '--csv', setup['val_csv'], '--output-path', fp32).returncode == 0
        amp_scores, fp32_scores = _scores(out.with_suffix('.csv')), _scores(fp32.with_suffix('.csv'))
        assert amp_scores != fp32_scores
        assert max(abs(amp_scores[k] - fp32_scores[k]) for k in fp32_scores) < 0.05


# --- 7. metrics of categories without pairs ---------------------------------------------------------------------

@pytest.mark.unit
def test_categories_without_pairs_stay_out_of_every_mean():
    from open_clip_rank.evaluation.metrics import METRIC_NAMES, ranking_metrics
    from open_clip_rank.files.atomic import json_safe
    pred, target = [1.0, 2.0, 3.0, 0.5, 7.0], [1.0, 2.0, 4.0, 3.0, 5.0]
    out = ranking_metrics(pred, target, ['a', 'a', 'a', 'a', 'single'])
    alone = ranking_metrics(pred[:4], target[:4], ['a'] * 4)
    for metric in METRIC_NAMES:
        if metric == 'mae':  # defined for one row: in the mean
            assert out['mae'] == pytest.approx((out['a/mae'] + out['single/mae']) / 2)
        else:
            assert math.isnan(out[f'single/{metric}']), metric
            assert out[metric] == pytest.approx(alone[metric]), metric
    assert out['pair_acc_official'] < 1.0  # a one-row category used to add 1.0
    none = ranking_metrics([1.0, 2.0], [3.0, 4.0], ['a', 'b'])
    assert math.isnan(none['pair_acc_official']) and math.isnan(none['srcc'])
    safe = json_safe({'m': none, 'l': [float('inf'), 1.5, np.float64('nan')]})
    assert safe['m']['pair_acc_official'] is None and safe['m']['mae'] == pytest.approx(2.0)
    assert safe['l'] == [None, 1.5, None]
    json.dumps(safe, allow_nan=False)  # valid JSON


@pytest.mark.unit
def test_undefined_metrics_are_null_in_the_cli_json_and_results_jsonl(setup, tmp_path):
    lone = tmp_path / 'lone.csv'  # one row per category: no pairs anywhere
    lines = Path(setup['val_csv']).read_text().splitlines()
    lone.write_text('\n'.join([lines[0], lines[1], lines[-1]]) + '\n')
    out = tmp_path / 'ranked'
    result = _rank(setup, '--csv', lone, '--output-path', out)
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.with_suffix('.json').read_text()
    assert 'NaN' not in text
    metrics = json.loads(text)['metrics']
    assert metrics['pair_acc_official'] is None and metrics['srcc'] is None and metrics['mae'] is not None
    from open_clip_rank.evaluation.validation import _report
    _report({'epoch': 1, 'srcc': float('nan'), 'mae': 1.0, 'precision': 'amp'}, 1,
            SimpleNamespace(save_logs=True, checkpoint_path=str(tmp_path), wandb=False), None)
    record = json.loads((tmp_path / 'results.jsonl').read_text(), parse_constant=lambda c: pytest.fail(c))
    assert record == {'epoch': 1, 'srcc': None, 'mae': 1.0, 'precision': 'amp'}


@pytest.mark.unit
def test_skipped_images_take_no_part_in_learned_prompt_metrics(tmp_path):
    from open_clip_rank.synthetic.ordinal import make_ordinal_dataset
    data = make_ordinal_dataset(tmp_path / 'ord', num_ranks=6, train_per_rank=1, val_per_rank=1, image_size=32)
    lines = Path(data['val_csv']).read_text().splitlines()
    broken = make_unreadable_image(tmp_path / 'ord' / 'broken.png')
    with_broken = tmp_path / 'val_broken.csv'
    with_broken.write_text('\n'.join(lines + [f'{broken}\t3']) + '\n')
    out = tmp_path / 'ranked'
    result = call_main(main, ['--model', ORDINAL, '--random-weights', '--device', 'cpu', '--csv', with_broken,
                              '--output-path', out, '--no-progress', '--probabilities'])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.with_suffix('.json').read_text())
    assert all(math.isfinite(v) for v in report['metrics'].values())  # the skipped row used to make them NaN
    assert [p['probs'] for p in report['probabilities'] if p['image'] == broken] == [None]


# --- a child process: no traceback either ------------------------------------------------------------------------

@pytest.mark.e2e
def test_cli_refusals_in_a_child_process(setup, tmp_path):
    env = subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(TEST_CONFIG_DIR))  # CUDA_VISIBLE_DEVICES='': no GPU
    base = [sys.executable, '-m', 'open_clip_rank.rank', '--model', MODEL, '--no-progress', '--images',
            str(setup['folder']), '--prompt', PROMPT, '--output-path', str(tmp_path / 'o')]
    cuda = subprocess.run(base + ['--checkpoint-path', str(setup['checkpoint']), '--device', 'cuda'], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert 'torch sees no CUDA device' in _one_error_line(cuda)
    nan = subprocess.run(base + ['--checkpoint-path', str(setup['nan_checkpoint']), '--device', 'cpu'], env=env,
                         capture_output=True, text=True, timeout=300, check=False)
    assert 'nothing could be ranked' in _one_error_line(nan, status=1)
    assert not list(tmp_path.iterdir())
