"""Inference: the rank CLI and Python API on generated data with a checkpoint written by the test."""
import csv
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import open_clip
from open_clip_rank.pictures.contact_sheet import sheet_size
from open_clip_rank.inference import load_rank_model, pairwise_scores, rank_images
from open_clip_rank.synthetic.counting import make_counting_dataset
from helpers import TEST_CONFIG_DIR, call_main, make_unreadable_image, subprocess_env

MODEL = 'tiny-vit-adapter'


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp('rankcli')
    data = make_counting_dataset(root, kinds=('circle', 'square'), max_count=4, train_per_count=1, val_per_count=2,
                                 image_size=32, seed=5)
    torch.manual_seed(0)
    model = open_clip.create_model(MODEL)
    checkpoint = root / 'epoch_1.pt'
    torch.save({'epoch': 1, 'name': 'test', 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}},
               checkpoint)
    config = root / 'model-config.json'  # the official inference script's config file
    config.write_text(json.dumps({**open_clip.get_model_config(MODEL), 'model_version': 'clip-adapter-v2'}))
    folder = root / 'folder'
    folder.mkdir()
    for i, path in enumerate(sorted(p for p in (root / 'images').glob('val_*.png'))[:6]):
        (folder / f'img{i}.png').write_bytes(path.read_bytes())
    make_unreadable_image(folder / 'broken.png')
    return {**data, 'root': root, 'checkpoint': checkpoint, 'config': config, 'folder': folder}


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _direct_scores(dataset, images, prompt):
    model, transform, tokenizer = load_rank_model(MODEL, checkpoint_path=str(dataset['checkpoint']), device='cpu')
    batch = torch.stack([transform(Image.open(p).convert('RGB')) for p in images])
    with torch.no_grad():
        return model(batch, tokenizer([prompt] * len(images)))['rank_scores']


@pytest.mark.e2e
def test_folder_cli_outputs_match_direct_model_calls(dataset, tmp_path):
    out = tmp_path / 'ranked'
    sheet = tmp_path / 'sheet.png'
    prompts = ['Rank the numbers of circle.', 'Rank the numbers of square.']
    cmd = [sys.executable, '-m', 'open_clip_rank.rank', '--model', MODEL, '--checkpoint-path',
           str(dataset['checkpoint']), '--images', str(dataset['folder']), '--prompt', prompts[0], '--prompt',
           prompts[1], '--output-path', str(out), '--contact-sheet', str(sheet), '--batch-size', '4', '--no-progress',
           '--pairwise']
    result = subprocess.run(cmd, env=subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(TEST_CONFIG_DIR)),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = _read_csv(out.with_suffix('.csv'))
    assert list(rows[0]) == ['image', 'prompt', 'score', 'rank', 'pairwise_score', 'pairwise_rank', 'category',
                             'target', 'skipped']
    good = sorted(str(p) for p in dataset['folder'].glob('img*.png'))
    broken = str(dataset['folder'] / 'broken.png')
    for prompt in prompts:
        mine = {r['image']: r for r in rows if r['prompt'] == prompt}
        assert set(mine) == set(good) | {broken}
        direct = _direct_scores(dataset, good, prompt)
        got = torch.tensor([float(mine[p]['score']) for p in good])
        torch.testing.assert_close(got, direct, rtol=1e-4, atol=1e-5)
        order = [p for p in sorted(good, key=lambda p: int(mine[p]['rank']))]
        assert order == [good[i] for i in torch.argsort(direct, descending=True).tolist()]
        # unreadable: listed as skipped (with the reason), never ranked or scored
        assert {k: mine[broken][k] for k in ('score', 'rank', 'pairwise_score', 'pairwise_rank')} == dict.fromkeys(
            ('score', 'rank', 'pairwise_score', 'pairwise_rank'), '')
        assert mine[broken]['skipped'] and not any(mine[p]['skipped'] for p in good)
        assert sorted(int(mine[p]['pairwise_rank']) for p in good) == list(range(1, len(good) + 1))
    assert [r['image'] for r in rows if r['prompt'] == prompts[0]][-1] == broken  # after the ranked rows
    report = json.loads(out.with_suffix('.json').read_text())
    assert [s['image'] for s in report['skipped']] == [broken] and report['num_ranked'] == len(good)
    assert 'metrics' not in report  # no ground truth for a folder
    with Image.open(sheet) as image:
        assert image.format == 'PNG'
        assert image.size == sheet_size([len(good), len(good)])  # the skipped image is not drawn


@pytest.mark.e2e
def test_csv_cli_with_official_flags_writes_metrics(dataset, tmp_path):
    out = tmp_path / 'stats'
    lines = open(dataset['val_csv']).read().splitlines()
    broken = str(dataset['folder'] / 'broken.png')
    csv_path = tmp_path / 'val_with_broken.csv'  # one unreadable image among the rows
    csv_path.write_text('\n'.join(lines + ['\t'.join([broken] + lines[1].split('\t')[1:])]) + '\n')
    cmd = [sys.executable, 'scripts/inference.py', '--config-path', str(dataset['config']),
           '--data-to-inference', str(csv_path), '--checkpoint-path', str(dataset['checkpoint']),
           '--output-path', str(out), '--is-ordinal-regression', '--pairwise']
    from helpers import REPO_ROOT
    result = subprocess.run(cmd, cwd=REPO_ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.with_suffix('.json').read_text())
    metrics = report['metrics']
    for key in ('srcc', 'krcc', 'plcc', 'mae', 'pair_acc', 'circle/srcc', 'square/mae'):
        assert key in metrics
    rows = _read_csv(out.with_suffix('.csv'))
    assert len(rows) == report['num_images'] == 2 * 5 * 2 + 1 and report['num_ranked'] == 2 * 5 * 2
    assert all(r['target'] != '' for r in rows)
    assert [r['image'] for r in rows if r['skipped']] == [broken] and report['skipped'][0]['image'] == broken
    assert metrics['num_samples'] == 2 * 5 * 2  # the skipped row takes no part
    # --pairwise: printed like the plain metrics, order-based metrics only (win probabilities have no scale)
    pairwise = report['pairwise_metrics']
    assert {'srcc', 'krcc', 'pair_acc', 'circle/srcc'} <= set(pairwise)
    assert not any(k.rpartition('/')[2] in ('mae', 'plcc') for k in pairwise)
    tables = result.stdout.split('Pair head (--pairwise')
    assert len(tables) == 2 and 'mae' in tables[0]
    assert 'srcc' in tables[1] and 'pair_acc' in tables[1] and 'mae' not in tables[1] and 'plcc' not in tables[1]


@pytest.mark.unit
def test_python_api_and_pairwise(dataset):
    model, transform, tokenizer = load_rank_model(MODEL, checkpoint_path=str(dataset['checkpoint']), device='cpu')
    images = sorted(str(p) for p in dataset['folder'].glob('img*.png'))
    ranked = rank_images(model, images, 'Rank the numbers of circle.', transform, tokenizer, batch_size=4)
    assert [r['rank'] for r in ranked] == list(range(1, len(images) + 1))
    assert all(a['score'] >= b['score'] for a, b in zip(ranked, ranked[1:]))
    # pairwise: blockwise aggregation equals the mean win probability from the full pair matrix
    scores, skipped = pairwise_scores(model, images, 'Rank the numbers of circle.', transform, tokenizer,
                                      batch_size=4, block_size=2)
    assert not skipped
    batch = torch.stack([transform(Image.open(p).convert('RGB')) for p in images])
    with torch.no_grad():
        probs = torch.sigmoid(model(batch, tokenizer(['Rank the numbers of circle.'] * len(images)))['pair_logits'])
    n = len(images)
    expected = ((probs + 1 - probs.T).sum(1) - 1) / (2 * (n - 1))
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.unit
def test_bad_inputs_are_clear(dataset, tmp_path):
    from open_clip_rank.rank import main
    base = ['--images', dataset['folder'], '--prompt', 'x', '--output-path', tmp_path / 'o']
    missing = call_main(main, base + ['--model', MODEL, '--checkpoint-path', tmp_path / 'nope.pt'])
    assert missing.returncode == 2 and 'nope.pt does not exist' in missing.stderr
    fixture = dataset['root'] / 'other.pt'
    other = open_clip.create_model('tiny-convnext-adapter')
    torch.save(other.state_dict(), fixture)
    mismatch = call_main(main, base + ['--model', MODEL, '--checkpoint-path', fixture])
    assert mismatch.returncode == 2 and 'does not fit this model' in mismatch.stderr.splitlines()[-1]
    assert not list(tmp_path.iterdir())


@pytest.mark.unit
def test_empty_prompt_is_refused(dataset, tmp_path, capsys):
    from open_clip_rank.rank import main
    for prompt in ('', '   '):
        assert main(['--model', MODEL, '--checkpoint-path', str(dataset['checkpoint']), '--images',
                     str(dataset['folder']), '--prompt', prompt, '--output-path', str(tmp_path / 'o')]) == 2
        assert 'open_clip_rank.rank: error: --prompt is empty' in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.unit
def test_contact_sheet_labels_show_targets_and_titles_keep_spaces(dataset, tmp_path):
    from PIL import ImageDraw, ImageFont
    from open_clip_rank.pictures import contact_sheet
    assert contact_sheet._label({'rank': 3, 'score': 2.154, 'target': 4.0}, 'rank', 'score') == '#3: 2.15  t=4'
    assert contact_sheet._label({'rank': 3, 'score': 2.154, 'target': None}, 'rank', 'score') == '#3: 2.15'
    # the title font keeps word spaces: "numbers of" is wider than "numbersof" by more than a pixel or so
    font = contact_sheet._font(contact_sheet.TITLE_SIZE)
    draw = ImageDraw.Draw(Image.new('RGB', (8, 8)))
    if isinstance(font, ImageFont.FreeTypeFont):
        assert draw.textlength('numbers of', font=font) - draw.textlength('numbersof', font=font) >= 3
    rows = [{'image': p, 'prompt': 'Rank the numbers of circle.', 'score': float(i), 'rank': i + 1, 'target': i}
            for i, p in enumerate(sorted(str(p) for p in dataset['folder'].glob('img*.png')))]
    size = contact_sheet.make_contact_sheet(rows, tmp_path / 'sheet.png')
    with Image.open(tmp_path / 'sheet.png') as image:
        assert image.size == size
    assert [p.name for p in tmp_path.iterdir()] == ['sheet.png']  # written atomically: no temporary left


@pytest.mark.e2e
def test_ranking_imports_no_training_module(dataset, tmp_path):
    """Inference and the rank CLI need OpenCLIP, never its training package (open_clip_train)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['rank', '--model', {MODEL!r}, '--checkpoint-path', {str(dataset['checkpoint'])!r}, "
        f"'--images', {str(dataset['folder'])!r}, '--prompt', 'Rank the numbers of circle.', '--pairwise', "
        f"'--output-path', {str(tmp_path / 'out')!r}, '--no-progress']\n"
        "try:\n"
        "    runpy.run_module('open_clip_rank.rank', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as exit_:\n"
        "    assert not exit_.code, exit_.code\n"
        "import open_clip_rank.inference\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('open_clip_train', 'training')))\n")
    result = subprocess.run([sys.executable, '-c', code], env=subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=str(
        TEST_CONFIG_DIR)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == '[]'
    assert (tmp_path / 'out.csv').is_file()
