"""Sharing a model on the Hugging Face Hub (``python -m open_clip_rank.push_to_hf_hub``, issue #21's Hub round trip).

The folder a push uploads (OpenCLIP's ``save_for_hf`` layout) loads back through ``local-dir:`` and ``hf-hub:`` (a
local Hugging Face cache, offline) into the same family with the same weights: the same scores. The family comes
from the config, never from the repo's name (OpenCLIP issue #668). The built-in tokenizer needs no file and no
network. The model card says what a ranker needs. The push itself runs on huggingface_hub's current API (checked
with a stand-in for ``HfApi``: nothing here reaches the network).
"""
import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import open_clip
from open_clip_rank import push_to_hf_hub as push
from open_clip_rank import registry
from open_clip_rank.hub import card as hub_card
from open_clip_rank.hub import folder as hub_folder
from open_clip_rank.inference import UninitialisedModelError, load_rank_model, predict_images, score_images
from open_clip_rank.integration import compat
from helpers import TEST_CONFIG_DIR, call_main, subprocess_env, write_rank_csv

MODELS = ('tiny-vit-adapter', 'tiny-rn-ordinal', 'tiny-vit')  # adapter, ordinal, plain CLIP (RankCLIP-trained)
PROMPT = 'Rank the numbers of circle.'
SNAPSHOT = '0' * 40


def _checkpoint(folder: Path, model_name: str, epoch: int = 2, seed: int = 11) -> Path:
    """A training checkpoint (OpenCLIP's layout, DDP prefixes) of ``model_name`` with fixed random weights."""
    torch.manual_seed(seed)
    model = open_clip.create_model(model_name)
    path = folder / 'checkpoints' / f'epoch_{epoch}.pt'
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({'epoch': epoch, 'name': folder.name,
                'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
    return path


def _params(folder: Path, **values) -> None:
    """The run's params.txt, as open_clip_train.main writes it (``name: value`` per line, sorted)."""
    defaults = {'pretrained': None, 'force_quick_gelu': False, 'force_image_size': None, 'force_context_length': None,
                'force_custom_text': False, 'siglip': False, 'image_mean': None, 'image_std': None,
                'image_interpolation': None, 'image_resize_mode': None, 'loss_opt': None, 'csv_separator': '\t',
                'csv_img_key': 'filepath', 'csv_caption_key': 'title', 'csv_value_key': 'value',
                'csv_category_key': 'cname', 'csv_dataset_sample_type': 'default', 'train_data': None}
    defaults.update(values)
    (folder / 'params.txt').write_text(''.join(f'{k}: {v}\n' for k, v in sorted(defaults.items())))


def _results(folder: Path, *records) -> None:
    (folder / 'results.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in records))


def _images(folder: Path):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(4):
        path = folder / f'{i}.png'
        Image.effect_noise((40, 36), 20 + 25 * i).convert('RGB').save(path)
        paths.append(str(path))
    return paths


def _scores(model, transform, tokenizer, paths):
    """What each kind of model gives for the images: scores under PROMPT, learned-prompt scores, image features."""
    if registry.family_for_model(model) is None:
        with torch.no_grad():
            return model.encode_image(torch.stack([transform(Image.open(p).convert('RGB')) for p in paths]))
    if model.needs_prompt:
        scores, skipped = score_images(model, paths, PROMPT, transform, tokenizer)
        assert not skipped
        return scores[:, 0]
    predictions, skipped = predict_images(model, paths, transform)
    assert not skipped
    return predictions['score']


def _reference(model_name, checkpoint, paths):
    """The scores of the checkpoint loaded the established way (a named config + the checkpoint)."""
    if registry.family_for_model_name(model_name) is None:
        model, _, transform = open_clip.create_model_and_transforms(model_name, pretrained=str(checkpoint))
        return _scores(model.eval(), transform, None, paths)
    return _scores(*load_rank_model(model_name, checkpoint_path=str(checkpoint), device='cpu'), paths)


def _loaded(name, paths):
    if registry.family_for_model_name(name) is None:
        model, _, transform = open_clip.create_model_and_transforms(name)
        return None, _scores(model.eval(), transform, None, paths)
    model, transform, tokenizer = load_rank_model(name, device='cpu')
    return registry.family_for_model(model), _scores(model, transform, tokenizer, paths)


@pytest.fixture(scope='module')
def pushed(tmp_path_factory):
    """Each family's checkpoint written as a push folder, named so that no folder name tells the family."""
    root = tmp_path_factory.mktemp('hub')
    paths = _images(root / 'images')
    out = {'root': root, 'paths': paths}
    for i, name in enumerate(MODELS):
        run = root / f'run{i}'
        checkpoint = _checkpoint(run, name)
        pushable = hub_folder.build_pushable(name, pretrained=str(checkpoint))
        folder = root / f'shared{i}'
        hub_folder.write_local_dir(pushable.model, pushable.tokenizer, pushable.model_config, folder, readme='# card\n')
        out[name] = {'checkpoint': checkpoint, 'folder': folder, 'expected': _reference(name, checkpoint, paths)}
    return out


# --- the folder --------------------------------------------------------------------------------------------

@pytest.mark.unit
@pytest.mark.parametrize('name', MODELS)
def test_push_folder_loads_back_as_local_dir_with_the_same_scores(pushed, name):
    folder = pushed[name]['folder']
    assert name.split('-')[-1] not in folder.name  # nothing in the name says which family it is
    assert sorted(p.name for p in folder.iterdir()) == ['README.md', 'open_clip_config.json',
                                                        'open_clip_model.safetensors', 'open_clip_pytorch_model.bin']
    family, scores = _loaded(f'local-dir:{folder}', pushed['paths'])
    assert family == registry.family_for_model_name(name)
    torch.testing.assert_close(scores, pushed[name]['expected'])
    config = json.loads((folder / 'open_clip_config.json').read_text())
    assert config['model_cfg'] == open_clip.get_model_config(name)  # the family's key included
    square = family is not None and family.square_resize
    assert config['preprocess_cfg']['resize_mode'] == ('squash' if square else 'shortest')
    assert type(open_clip.get_tokenizer(f'local-dir:{folder}')) is open_clip.tokenizer.SimpleTokenizer


@pytest.mark.unit
def test_square_resize_reaches_openclips_own_transforms(pushed):
    """open_clip.create_model_and_transforms on the pushed folder resizes as the family trained: no crop."""
    folder = pushed['tiny-vit-adapter']['folder']
    _, _, preprocess = open_clip.create_model_and_transforms(f'local-dir:{folder}')
    _, transform, _ = load_rank_model(f'local-dir:{folder}', device='cpu')
    image = Image.open(pushed['paths'][0]).convert('RGB')  # 40x36: a crop would cut it
    torch.testing.assert_close(preprocess(image), transform(image))


@pytest.mark.unit
def test_openclips_save_for_hf_keeps_the_family_from_the_config(tmp_path, pushed):
    """OpenCLIP's own writer, given the model's config (as its push passes ``get_model_config(name)``), keeps the
    family key: the folder builds the family back, whatever it is called."""
    openclip_save_for_hf, _ = compat.openclip_hub_writers()
    model, _, _ = load_rank_model('tiny-vit-adapter', checkpoint_path=str(pushed['tiny-vit-adapter']['checkpoint']),
                                  device='cpu')
    folder = tmp_path / 'plain-looking-name'
    openclip_save_for_hf(model, hub_folder._ShipsWithOpenCLIP(), open_clip.get_model_config('tiny-vit-adapter'), folder)
    family, scores = _loaded(f'local-dir:{folder}', pushed['paths'])
    assert family is registry.FAMILIES['adapter']
    torch.testing.assert_close(scores, pushed['tiny-vit-adapter']['expected'])


@pytest.mark.unit
def test_a_config_without_the_family_key_is_refused(tmp_path, pushed):
    pushable = hub_folder.build_pushable('tiny-vit-adapter', pretrained=str(pushed['tiny-vit-adapter']['checkpoint']))
    with pytest.raises(ValueError, match=r"has no family key, but the model is adapter \(config key 'adapter_cfg'\)"):
        hub_folder.save_for_hf(pushable.model, pushable.tokenizer, open_clip.get_model_config('tiny-vit'),
                               tmp_path / 'x')
    plain = hub_folder.build_pushable('tiny-vit', pretrained=str(pushed['tiny-vit']['checkpoint']))
    with pytest.raises(ValueError, match='adapter key'):
        hub_folder.save_for_hf(plain.model, plain.tokenizer, open_clip.get_model_config('tiny-vit-adapter'),
                               tmp_path / 'y')


@pytest.mark.unit
def test_round_trip_check_catches_a_config_that_builds_another_model(tmp_path, pushed):
    pushable = hub_folder.build_pushable('tiny-vit', pretrained=str(pushed['tiny-vit']['checkpoint']))
    folder = tmp_path / 'other'
    hub_folder.save_for_hf(pushable.model, pushable.tokenizer, {**pushable.model_config, 'quick_gelu': True}, folder)
    with pytest.raises(hub_folder.RoundTripError, match='gives other image features'):
        hub_folder.check_round_trip(folder, pushable.model, pushable.tokenizer)


@pytest.mark.unit
def test_config_path_and_the_runs_overrides(tmp_path, pushed):
    """--config-path (a run's config.json) and a run trained with --force-quick-gelu: the config written is the one
    the weights were trained with, and the folder reproduces the model."""
    run = tmp_path / 'run'
    checkpoint = _checkpoint(run, 'tiny-vit-adapter', epoch=1)
    _params(run, model='tiny-vit-adapter', force_quick_gelu=True)
    config_file = run / 'config.json'
    config_file.write_text(json.dumps(open_clip.get_model_config('tiny-vit-adapter')))
    folder = tmp_path / 'out'
    result = call_main(push.main, ['--config-path', config_file, '--pretrained', checkpoint, '--local-dir', folder])
    assert result.returncode == 0, result.stderr
    written = json.loads((folder / 'open_clip_config.json').read_text())['model_cfg']
    assert written['quick_gelu'] is True and 'adapter_cfg' in written
    expected = open_clip.create_model('tiny-vit-adapter', pretrained=str(checkpoint), force_quick_gelu=True)
    model, transform, tokenizer = load_rank_model(f'local-dir:{folder}', device='cpu')
    torch.testing.assert_close(_scores(model, transform, tokenizer, pushed['paths']),
                               _scores(expected.eval(), transform, tokenizer, pushed['paths']))


@pytest.mark.unit
def test_a_local_dir_or_hub_source_is_pushed_with_its_own_weights(tmp_path, pushed):
    """No --pretrained: a local-dir: (or hf-hub:) model's own weights, e.g. to re-push a downloaded repo."""
    source = pushed['tiny-rn-ordinal']['folder']
    folder = tmp_path / 'again'
    result = call_main(push.main, ['--model', f'local-dir:{source}', '--local-dir', folder, '--precision', 'bf16'])
    assert result.returncode == 0, result.stderr
    family, scores = _loaded(f'local-dir:{folder}', pushed['paths'])
    assert family is registry.FAMILIES['ordinal']
    torch.testing.assert_close(scores, pushed['tiny-rn-ordinal']['expected'], atol=0.05, rtol=0.02)  # bf16 weights
    weights = torch.load(folder / 'open_clip_pytorch_model.bin', weights_only=True)
    assert torch.bfloat16 in {v.dtype for v in weights.values()}


# --- the model card ------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_card_of_an_adapter_run(tmp_path):
    run = tmp_path / 'logs' / 'counting'
    checkpoint = _checkpoint(run, 'tiny-vit-adapter', epoch=2)
    csv = write_rank_csv(tmp_path, counts=range(1, 4), per_count=1)
    _params(run, model='tiny-vit-adapter', pretrained='laion400m_e32', train_data=csv, csv_dataset_sample_type='rank')
    _results(run, {'epoch': 1, 'srcc': 0.111, 'precision': 'amp'},
             {'epoch': 2, 'srcc': 0.5, 'krcc': 0.4, 'plcc': 0.6, 'mae': 1.25, 'pair_acc': 0.7, 'circle/srcc': 0.55,
              'square/srcc': 0.45, 'num_samples': 6.0, 'precision': 'amp'})
    folder = tmp_path / 'out'
    result = call_main(push.main, ['--pretrained', checkpoint, '--local-dir', folder, '--repo-id', 'org/counter',
                                   '--dataset-name', 'Counting'])
    assert result.returncode == 0, result.stderr
    assert 'hf upload org/counter' in result.stdout
    card = (folder / 'README.md').read_text()
    assert 'library_name: open_clip' in card and 'datasets:\n- counting\n' in card and '- adapter\n' in card
    assert '**Base model:** tiny-vit (pretrained: laion400m_e32)' in card
    assert '  - Rank the numbers of circle.\n  - Rank the numbers of square.\n' in card
    assert '**Categories:**\n  - circle\n  - square\n' in card
    assert 'Higher = ranked first' in card and 'from 1 to 3' in card  # direction, units of the targets
    assert '**Loss:** single-head' in card and '**Epoch:** 2' in card
    assert "python -m open_clip_rank.rank --model hf-hub:org/counter --images FOLDER --prompt 'Rank the numbers " \
           "of circle.'" in card
    assert "(epoch 2, from results.jsonl, precision amp)" in card
    assert '| | srcc | krcc | plcc | mae | pair_acc |' in card
    assert '| mean | 0.5000 | 0.4000 | 0.6000 | 1.2500 | 0.7000 |' in card
    assert '| circle | 0.5500 |' in card and '0.1110' not in card  # the pushed epoch's record, not another's
    assert str(tmp_path) not in card  # no local path on a public card


@pytest.mark.unit
def test_card_of_an_ordinal_model_with_a_metrics_file(tmp_path):
    checkpoint = _checkpoint(tmp_path, 'tiny-rn-ordinal', epoch=4)
    metrics = tmp_path / 'metrics.json'
    metrics.write_text(json.dumps({'mae_exp': 0.75, 'acc_exp': 0.5, 'mae_max': 0.8, 'acc_max': 0.45,
                                   'ordinality': 0.9, 'srcc': 0.3}))
    folder = tmp_path / 'out'
    result = call_main(push.main, ['--model', 'tiny-rn-ordinal', '--pretrained', checkpoint, '--local-dir', folder,
                                   '--metrics', metrics, '--instructions', 'age estimation'])
    assert result.returncode == 0, result.stderr
    card = (folder / 'README.md').read_text()
    assert 'pipeline_tag: image-classification' in card and 'OrdinalCLIP' in card
    assert 'real number in [0, 5]' in card and 'ranked first' in card
    assert '| | mae_exp | acc_exp | mae_max | acc_max | ordinality |' in card and 'srcc' not in card  # its columns
    assert '--model hf-hub:ORG/NAME --images FOLDER --output-path ranked' in card and '--prompt' not in card
    assert 'predict_images(model, paths, transform)' in card


@pytest.mark.unit
def test_card_of_a_rankclip_trained_clip_model(tmp_path):
    run = tmp_path / 'logs' / 'rankclip'
    checkpoint = _checkpoint(run, 'tiny-vit', epoch=1)
    _params(run, model='tiny-vit', loss_opt='rankclip', train_data='/data/{00000..00009}.tar')
    _results(run, {'epoch': 1, 'image_to_text_mean_rank': 3.5, 'val_loss': 0.25, 'precision': 'amp'})
    folder = tmp_path / 'out'
    result = call_main(push.main, ['--pretrained', checkpoint, '--local-dir', folder, '--repo-id', 'org/clip'])
    assert result.returncode == 0, result.stderr
    card = (folder / 'README.md').read_text()
    assert registry.LOSSES['rankclip'].summary in card and 'CLIP (CLIP, OpenCLIP' in card
    assert "open_clip.create_model_and_transforms('hf-hub:org/clip')" in card
    assert '| image_to_text_mean_rank | 3.5000 |' in card and '| val_loss | 0.2500 |' in card
    assert '**Training data:** {00000..00009}.tar' in card


@pytest.mark.unit
def test_every_family_and_sample_type_has_a_card(tmp_path):
    for family in registry.FAMILIES.values():
        part = registry.import_function(family.model_card)(open_clip.get_model_config(
            next(n for n in MODELS if registry.family_for_model_name(n) is family)), None)
        assert part['description'] and 'ranked first' in part['score']
        sample_type = registry.SAMPLE_TYPES[family.sample_types[0]]
        assert sample_type.card_metrics and sample_type.describe_data
    csv = write_rank_csv(tmp_path, counts=(2, 7), per_count=1)
    options = SimpleNamespace(**hub_card.DATA_OPTION_DEFAULTS, num_ranks=None)
    described = registry.import_function(registry.SAMPLE_TYPES['rank'].describe_data)(csv, options)
    assert described == {'rows': 4, 'instructions': ['Rank the numbers of circle.', 'Rank the numbers of square.'],
                         'categories': ['circle', 'square'], 'targets': [2.0, 7.0], 'target_column': 'value'}


# --- refusals, one line each -------------------------------------------------------------------------------

@pytest.mark.unit
def test_refusals(tmp_path, pushed):
    adapter = pushed['tiny-vit-adapter']['checkpoint']
    base_only = tmp_path / 'base.pt'
    torch.save({k: v for k, v in open_clip.create_model('tiny-vit').state_dict().items()}, base_only)
    occupied = tmp_path / 'occupied'
    occupied.mkdir()
    (occupied / 'pytorch_model.bin').write_bytes(b'x')
    config_only = tmp_path / 'config_only'
    config_only.mkdir()
    (config_only / 'open_clip_config.json').write_text(json.dumps({'model_cfg': open_clip.get_model_config('tiny-vit'),
                                                                   'preprocess_cfg': {}}))
    results = tmp_path / 'results.jsonl'
    _results(tmp_path, {'epoch': 1, 'srcc': 0.1})
    out = ['--local-dir', tmp_path / 'out']
    cases = [
        (['--model', 'tiny-vit-adapter', '--pretrained', adapter], 'give --repo-id ORG/NAME to push, or --local-dir'),
        (['--model', 'tiny-vit-adapter', '--pretrained', adapter, '--image-resize-mode', 'longest', *out],
         'adapter models are resized to the square input without cropping'),
        (['--model', 'tiny-vit-adapter', '--pretrained', adapter, '--hf-tokenizer-self', '--repo-id', 'a/b'],
         "this model uses OpenCLIP's built-in tokenizer"),
        (['--model', 'tiny-vit-adapter', '--pretrained', base_only, *out], 'holds base CLIP weights only'),
        (['--model', 'tiny-vit-adapter', *out], 'no weights to push'),
        (['--model', f'local-dir:{occupied.parent}', *out], 'does not exist'),  # no open_clip_config.json
        (['--model', f'local-dir:{config_only}', *out], 'holds no weights file'),
        (['--model', 'tiny-vit-adaptr', '--pretrained', adapter, *out], "unknown model 'tiny-vit-adaptr'"),
        (['--model', 'tiny-vit-adapter', '--pretrained', adapter, '--metrics', results, *out],
         'has no record of epoch 2'),
        (['--model', 'tiny-vit-adapter', '--pretrained', adapter, '--local-dir', occupied],
         'holds other weights (pytorch_model.bin)'),
        (['--model', 'tiny-vit-adapter', '--pretrained', 'nonsense_tag', *out], 'neither a file nor a pretrained tag'),
        (['--model', 'tiny-vit-adapter', '--pretrained', adapter.parent.parent, *out],
         'is a folder: give a checkpoint'),
        (['--model', 'tiny-rn-ordinal', '--pretrained', adapter, *out], 'does not fit this model'),
    ]
    for argv, message in cases:
        result = call_main(push.main, argv)
        assert result.returncode == 2, (argv, result.stderr)
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith('open_clip_rank.push_to_hf_hub: error: ') and message in last, (argv, last)
    assert not (tmp_path / 'out').exists() and sorted(p.name for p in occupied.iterdir()) == ['pytorch_model.bin']
    assert issubclass(UninitialisedModelError, ValueError)


@pytest.mark.unit
def test_openclip_writers_that_moved_fail_in_one_line(monkeypatch):
    import importlib
    module = importlib.import_module('open_clip.push_to_hf_hub')
    monkeypatch.delattr(module, 'generate_readme')
    with pytest.raises(compat.PatchPointMissing, match=r'has no patch point open_clip\.push_to_hf_hub\.generate_'
                                                       r'readme.*open_clip_torch>=3\.3,<3\.4') as err:
        compat.openclip_hub_writers()
    assert '\n' not in str(err.value)


# --- the push, on huggingface_hub's current API ---------------------------------------------------------------

class _FakeApi:
    """Stands in for huggingface_hub.HfApi: records the calls and what the uploaded folder held."""
    calls = []
    has_readme = False

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False, **_):
        from huggingface_hub import RepoUrl
        _FakeApi.calls.append(('create_repo', repo_id, private, exist_ok))
        return RepoUrl(f'https://huggingface.co/{repo_id}')

    def file_exists(self, repo_id, filename, revision=None, **_):
        _FakeApi.calls.append(('file_exists', repo_id, filename))
        return _FakeApi.has_readme

    def upload_folder(self, repo_id, folder_path, revision=None, create_pr=None, commit_message=None, **_):
        files = {p.name: p.read_bytes() for p in Path(folder_path).iterdir()}
        _FakeApi.calls.append(('upload_folder', repo_id, sorted(files), commit_message, create_pr))
        _FakeApi.uploaded = files
        return 'https://huggingface.co/commit'


@pytest.mark.unit
@pytest.mark.parametrize('has_readme', [False, True])
def test_push_uses_huggingface_hubs_current_api(monkeypatch, tmp_path, pushed, has_readme):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, 'HfApi', _FakeApi)
    monkeypatch.setattr(_FakeApi, 'calls', [])
    monkeypatch.setattr(_FakeApi, 'has_readme', has_readme)
    result = call_main(push.main, ['--model', 'tiny-vit-adapter', '--pretrained',
                                   pushed['tiny-vit-adapter']['checkpoint'], '--repo-id', 'org/shared', '--private',
                                   '--create-pr'])
    assert result.returncode == 0, result.stderr
    expected = ['open_clip_config.json', 'open_clip_model.safetensors', 'open_clip_pytorch_model.bin']
    assert _FakeApi.calls == [('create_repo', 'org/shared', True, True), ('file_exists', 'org/shared', 'README.md'),
                              ('upload_folder', 'org/shared', expected if has_readme else ['README.md', *expected],
                               'Add model', True)]
    config = json.loads(_FakeApi.uploaded['open_clip_config.json'])
    assert 'adapter_cfg' in config['model_cfg'] and config['preprocess_cfg']['resize_mode'] == 'squash'


@pytest.mark.unit
def test_a_failed_push_is_one_line(monkeypatch, pushed):
    import huggingface_hub
    from huggingface_hub.errors import OfflineModeIsEnabled

    class Offline(_FakeApi):
        def create_repo(self, repo_id, **_):
            raise OfflineModeIsEnabled('Cannot reach https://huggingface.co: offline mode is enabled.')

    monkeypatch.setattr(huggingface_hub, 'HfApi', Offline)
    result = call_main(push.main, ['--model', 'tiny-vit-adapter', '--pretrained',
                                   pushed['tiny-vit-adapter']['checkpoint'], '--repo-id', 'org/shared'])
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith('open_clip_rank.push_to_hf_hub: error: the push to org/shared failed '
                           '(OfflineModeIsEnabled: Cannot reach') and '--local-dir' in last


# --- hf-hub:, offline ------------------------------------------------------------------------------------------

HF_SCRIPT = """
import json, sys, torch
import open_clip
from open_clip_rank import registry
from open_clip_rank.inference import load_rank_model, predict_images, score_images
from PIL import Image
paths = sys.argv[2:]
out = {}
for repo in json.loads(sys.argv[1]):
    name = 'hf-hub:' + repo
    config = registry.family_for_model_name(name)
    if config is None:
        model, _, transform = open_clip.create_model_and_transforms(name)
        with torch.no_grad():
            scores = model.eval().encode_image(torch.stack([transform(Image.open(p).convert('RGB')) for p in paths]))
        family = None
    else:
        model, transform, tokenizer = load_rank_model(name, device='cpu')
        family = registry.family_for_model(model).name
        if model.needs_prompt:
            scores = score_images(model, paths, %r, transform, tokenizer)[0][:, 0]
        else:
            scores = predict_images(model, paths, transform)[0]['score']
    out[repo] = {'family': family, 'scores': scores.tolist(),
                 'tokenizer': type(open_clip.get_tokenizer(name)).__name__}
print(json.dumps(out))
""" % PROMPT


@pytest.mark.e2e
def test_hf_hub_round_trip_offline(pushed, tmp_path):
    """Each pushed folder as a Hub repo named without its family (``hf-hub:some/other-name``), read from a local
    Hugging Face cache with the network off: the same family, the same scores, the built-in tokenizer."""
    cache = tmp_path / 'hf'
    repos = {}
    for i, name in enumerate(MODELS):
        repo = f'some/other-name{i}'
        entry = cache / f"models--{repo.replace('/', '--')}"
        shutil.copytree(pushed[name]['folder'], entry / 'snapshots' / SNAPSHOT)
        (entry / 'refs').mkdir()
        (entry / 'refs' / 'main').write_text(SNAPSHOT)
        repos[repo] = name
    env = subprocess_env(HF_HUB_OFFLINE=1, HF_HUB_CACHE=cache, HF_HOME=tmp_path / 'hf_home',
                         OPEN_CLIP_RANK_MODEL_CONFIGS=TEST_CONFIG_DIR)
    result = subprocess.run([sys.executable, '-c', HF_SCRIPT, json.dumps(list(repos)), *pushed['paths']], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    for repo, name in repos.items():
        family = registry.family_for_model_name(name)
        assert out[repo]['family'] == (family.name if family else None), repo
        torch.testing.assert_close(torch.tensor(out[repo]['scores']), pushed[name]['expected'])
        assert out[repo]['tokenizer'] == 'SimpleTokenizer'


@pytest.mark.unit
def test_the_ordinal_baseline_card_says_prototypes_not_prompts():
    from open_clip_rank.models.ordinal_card import ordinal_model_card
    card = ordinal_model_card(open_clip.get_model_config('tiny-rn-baseline-ordinal'))
    assert 'class prototypes' in card['description'] and 'prompts for' not in card['description']
    assert 'learned rank prompts' in ordinal_model_card(open_clip.get_model_config('tiny-rn-ordinal'))['score']
