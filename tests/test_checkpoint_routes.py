"""Every way of naming a rank model loads the given checkpoint; no silent random weights; damaged files named.

Routes: a built-in (registered) name, ``local-dir:DIR``, ``hf-hub:ORG/REPO`` (offline, from a local
Hugging Face cache the test writes) and ``--config-path``. A checkpoint for another config fails on each
with the shape-mismatch error; a model left without weights is refused unless random weights are asked for.
"""
import copy
import json
import subprocess
import sys

import pytest
import torch
from PIL import Image

import open_clip
from open_clip_rank import CheckpointMismatchError
from open_clip_rank.files.checkpoints import UnreadableCheckpointError
from open_clip_rank.inference import UninitialisedModelError, load_rank_model, score_images
from helpers import TEST_CONFIG_DIR, call_main, subprocess_env

MODEL = 'tiny-vit-adapter'
PROMPT = 'Rank the numbers of circle.'
HF_REPO = 'local-test/tiny-rank'


def _openclip_dir(folder, cfg, weights=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / 'open_clip_config.json').write_text(json.dumps({'model_cfg': cfg, 'preprocess_cfg': {}}))
    if weights is not None:
        torch.save(weights, folder / 'open_clip_pytorch_model.bin')
    return folder


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('routes')
    cfg = open_clip.get_model_config(MODEL)
    torch.manual_seed(123)
    trained = open_clip.create_model(MODEL).eval()  # stands in for a trained model: any fixed weights
    checkpoint = root / 'epoch_3.pt'  # laid out as OpenCLIP's training saves it (DDP prefixes)
    torch.save({'epoch': 3, 'name': 'run', 'state_dict': {f'module.{k}': v for k, v in trained.state_dict().items()}},
               checkpoint)
    wrong_cfg = copy.deepcopy(cfg)
    wrong_cfg['vision_cfg']['width'] = 48  # another config: an image tower of another width
    wrong_dir = root / 'wrong_cfg'
    wrong_dir.mkdir()
    (wrong_dir / 'tiny-vit-adapter-wide.json').write_text(json.dumps(wrong_cfg))
    open_clip.add_model_config(wrong_dir)
    wrong = root / 'wide.pt'
    torch.save(open_clip.create_model('tiny-vit-adapter-wide').state_dict(), wrong)
    images = root / 'images'
    images.mkdir()
    paths = []
    for i in range(4):
        path = images / f'{i}.png'
        Image.effect_noise((32, 32), 20 + 20 * i).convert('RGB').save(path)
        paths.append(str(path))
    _, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    config_file = root / 'model-config.json'
    config_file.write_text(json.dumps(cfg))
    hf_cache = root / 'hf'  # a Hugging Face cache holding the repo's config only (no weights)
    snapshot = hf_cache / f"models--{HF_REPO.replace('/', '--')}" / 'snapshots' / ('0' * 40)
    _openclip_dir(snapshot, cfg)
    (snapshot.parent.parent / 'refs').mkdir()
    (snapshot.parent.parent / 'refs' / 'main').write_text('0' * 40)
    return {'root': root, 'cfg': cfg, 'trained': trained, 'checkpoint': checkpoint, 'wrong': wrong, 'paths': paths,
            'config_file': config_file, 'hf_cache': hf_cache,
            'local_dir': _openclip_dir(root / 'local', cfg),
            'local_dir_with_weights': _openclip_dir(root / 'local_w', cfg, trained.state_dict())}


def _scores(model, transform, tokenizer, paths):
    scores, skipped = score_images(model, paths, PROMPT, transform, tokenizer)
    assert not skipped
    return scores[:, 0]


def _expected(setup):
    _, _, preprocess = open_clip.create_model_and_transforms(MODEL)
    from open_clip_rank.data.transforms import rank_transforms
    transform = rank_transforms(preprocess)[1]
    return _scores(setup['trained'], transform, open_clip.get_tokenizer(MODEL), setup['paths'])


def _route(setup, route):
    if route == 'built-in':
        return {'model': MODEL}
    if route == 'local-dir':
        return {'model': f"local-dir:{setup['local_dir']}"}
    return {'config_path': str(setup['config_file'])}


@pytest.mark.unit
@pytest.mark.parametrize('route', ['built-in', 'local-dir', 'config-path'])
def test_each_route_loads_the_checkpoint_and_refuses_another_configs(setup, route):
    torch.manual_seed(7)  # random init would differ from the checkpoint's weights
    model, transform, tokenizer = load_rank_model(**_route(setup, route), checkpoint_path=str(setup['checkpoint']),
                                                  device='cpu')
    torch.testing.assert_close(_scores(model, transform, tokenizer, setup['paths']), _expected(setup))
    with pytest.raises(CheckpointMismatchError, match=r"wide\.pt does not fit this model: '.*' expects shape"):
        load_rank_model(**_route(setup, route), checkpoint_path=str(setup['wrong']), device='cpu')


@pytest.mark.unit
def test_local_dir_weights_load_and_a_checkpoint_replaces_them(setup):
    model, transform, tokenizer = load_rank_model(f"local-dir:{setup['local_dir_with_weights']}", device='cpu')
    torch.testing.assert_close(_scores(model, transform, tokenizer, setup['paths']), _expected(setup))
    with pytest.raises(CheckpointMismatchError, match='expects shape'):
        load_rank_model(f"local-dir:{setup['local_dir_with_weights']}", checkpoint_path=str(setup['wrong']),
                        device='cpu')


@pytest.mark.unit
@pytest.mark.parametrize('route', ['built-in', 'local-dir', 'config-path'])
def test_no_weights_is_refused_unless_asked_for(setup, route):
    with pytest.raises(UninitialisedModelError, match='--random-weights'):
        load_rank_model(**_route(setup, route), device='cpu')
    model, _, _ = load_rank_model(**_route(setup, route), device='cpu', random_weights=True)
    assert model.training is False


@pytest.mark.unit
@pytest.mark.parametrize('route', ['built-in', 'local-dir', 'config-path'])
def test_base_clip_weights_alone_are_refused_unless_asked_for(setup, route, tmp_path):
    """A plain CLIP checkpoint fills the towers only: the adapter would rank with random weights."""
    base = tmp_path / 'base_clip.pt'
    state = {k: v for k, v in setup['trained'].state_dict().items() if not k.startswith('adapter.')}
    assert len(state) < len(setup['trained'].state_dict())
    torch.save(state, base)
    with pytest.raises(UninitialisedModelError, match=r"base_clip\.pt holds base CLIP weights only: the adapter"):
        load_rank_model(**_route(setup, route), checkpoint_path=str(base), device='cpu')


@pytest.mark.unit
def test_damaged_checkpoint_and_unknown_model_are_one_line(setup, tmp_path):
    data = setup['checkpoint'].read_bytes()
    cut = tmp_path / 'cut.pt'
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(UnreadableCheckpointError, match=r'cut\.pt cannot be read .*truncated or corrupt'):
        load_rank_model(MODEL, checkpoint_path=str(cut), device='cpu')
    legacy = tmp_path / 'legacy.pt'  # not a zip: only loading finds the damage, the load_checkpoint patch names it
    torch.save(setup['trained'].state_dict(), legacy, _use_new_zipfile_serialization=False)
    legacy.write_bytes(legacy.read_bytes()[:-100])  # cut in the tensor data
    with pytest.raises(UnreadableCheckpointError, match=r'legacy\.pt cannot be read'):
        open_clip.create_model(MODEL, pretrained=str(legacy))
    with pytest.raises(ValueError, match=r"unknown model 'tiny-vit-adaptr' \(closest: tiny-vit-adapter") as err:
        load_rank_model('tiny-vit-adaptr', checkpoint_path=str(setup['checkpoint']))
    assert '\n' not in str(err.value) and 'open_clip.list_models()' in str(err.value)


HF_SCRIPT = """
import json, sys, torch
import open_clip
from open_clip_rank.inference import load_rank_model, score_images
out = {}
for name, ckpt in (('trained', sys.argv[1]), ('wrong', sys.argv[2]), ('none', None)):
    try:
        model, transform, tokenizer = load_rank_model('hf-hub:%s', checkpoint_path=ckpt, device='cpu')
        out[name] = score_images(model, sys.argv[3:], %r, transform, tokenizer)[0][:, 0].tolist()
    except ValueError as err:
        out[name] = type(err).__name__ + ': ' + str(err)
print(json.dumps(out))
""" % (HF_REPO, PROMPT)


@pytest.mark.e2e
def test_hf_hub_route_offline(setup):
    """hf-hub: through OpenCLIP's own Hugging Face resolution, from a local cache (HF_HUB_OFFLINE)."""
    env = subprocess_env(HF_HUB_OFFLINE=1, HF_HUB_CACHE=setup['hf_cache'], HF_HOME=setup['root'] / 'hf_home')
    result = subprocess.run([sys.executable, '-c', HF_SCRIPT, str(setup['checkpoint']), str(setup['wrong']),
                             *setup['paths']], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    torch.testing.assert_close(torch.tensor(out['trained']), _expected(setup))
    assert out['wrong'].startswith('CheckpointMismatchError') and 'expects shape' in out['wrong']
    assert out['none'].startswith('UninitialisedModelError')


@pytest.mark.e2e
def test_rank_cli_local_dir_checkpoint_and_refusals(setup, tmp_path):
    """The issue's command: --model local-dir:DIR --checkpoint-path CKPT ranks with the checkpoint's weights."""
    env = subprocess_env(OPEN_CLIP_RANK_MODEL_CONFIGS=TEST_CONFIG_DIR)
    folder = setup['root'] / 'images'
    out = tmp_path / 'ranked'
    cmd = [sys.executable, '-m', 'open_clip_rank.rank', '--model', f"local-dir:{setup['local_dir']}",
           '--checkpoint-path', str(setup['checkpoint']), '--images', str(folder), '--prompt', PROMPT,
           '--output-path', str(out), '--no-progress']
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import csv
    with open(out.with_suffix('.csv')) as f:
        rows = {r['image']: float(r['score']) for r in csv.DictReader(f)}
    torch.testing.assert_close(torch.tensor([rows[p] for p in setup['paths']]), _expected(setup))
    # no checkpoint: refused with one line, exit status 2, nothing written
    from open_clip_rank.rank import main
    refused = call_main(main, cmd[3:5] + cmd[7:-3] + ['--output-path', str(tmp_path / 'none'), '--no-progress'])
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith('open_clip_rank.rank: error: model local-dir:')
    assert 'random' in refused.stderr and not (tmp_path / 'none.csv').exists()
