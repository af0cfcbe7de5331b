"""Adapter models built through open_clip.create_model: contract, locking, weights, bad input."""
from types import SimpleNamespace
import json
import logging

import pytest
import torch

import open_clip
from open_clip import pretrained as oc_pretrained
from open_clip_rank import CheckpointMismatchError, RankAdapterCLIP, RankAdapterCustomTextCLIP
from open_clip_rank.integration.hook import register_derived_pretrained
from helpers import fixture_path

pytestmark = pytest.mark.unit

TINY = ['tiny-vit-adapter', 'tiny-convnext-adapter', 'tiny-customtext-adapter']


def _batch(model_name, n=4):
    size = open_clip.get_model_config(model_name)['vision_cfg']['image_size']
    tokenizer = open_clip.get_tokenizer(model_name)
    texts = tokenizer([f'Rank the numbers of {w}.' for w in ('cat', 'dog', 'cat', 'cup')[:n]])
    return torch.randn(n, 3, size, size), texts, torch.arange(n, dtype=torch.float32)


@pytest.mark.parametrize('name', TINY)
def test_forward_contract(name):
    torch.manual_seed(0)
    model = open_clip.create_model(name)
    images, texts, targets = _batch(name)
    out = model(images, texts, targets=targets)
    assert out['rank_scores'].shape == (4,)
    assert out['pair_logits'].shape == (4, 4)
    assert out['targets'] is targets
    assert out['image_tokens'].ndim == 3 and out['text_features'].shape[0] == 4
    assert out['logit_scale'].ndim == 0
    model.eval()
    with torch.no_grad():
        full = model(images, texts)
        cheap = model.rank_scores(images, texts)
    torch.testing.assert_close(cheap, full['rank_scores'])
    assert 'pair_logits' not in model(images, texts, with_pairs=False)


def test_custom_text_config_builds_custom_text_model():
    assert isinstance(open_clip.create_model('tiny-customtext-adapter'), RankAdapterCustomTextCLIP)
    assert isinstance(open_clip.create_model('tiny-vit-adapter'), RankAdapterCLIP)


# What trains after the seed's --lock-image --lock-text, as in the original code: the adapter, the text token
# and positional embeddings and ln_final (its lock_text_tower freezes only the transformer blocks) and a ViT's
# visual.proj (its "WORKAROUND: locking image tower but not proj"). The text projection, logit scale and a
# ResNet's attention pool feed no rank output: the original leaves them requires_grad without ever giving
# them a gradient; here they are frozen outright.
OFFICIAL_TRAINABLE = {
    'tiny-vit-adapter': ('adapter.', 'token_embedding.weight', 'positional_embedding', 'ln_final.', 'visual.proj'),
    'tiny-convnext-adapter': ('adapter.', 'token_embedding.weight', 'positional_embedding', 'ln_final.'),
    'tiny-customtext-adapter': ('adapter.', 'text.token_embedding.weight', 'text.positional_embedding',
                                'text.ln_final.', 'visual.proj'),
}


def _trainable_after_locks(name, strict):
    from open_clip_rank.integration.run_state import end_run, start_run
    start_run(SimpleNamespace(strict_tower_lock=strict))  # the run's flags, as --strict-tower-lock
    try:
        model = open_clip.create_model(name)
        model.lock_image_tower()
        model.lock_text_tower(0, False)  # OpenCLIP's CLI passes freeze_layer_norm=False without its flag
    finally:
        end_run()
    return model, {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize('name', sorted(OFFICIAL_TRAINABLE))
def test_seed_locks_train_the_official_parameter_set(name, caplog):
    with caplog.at_level('INFO', logger='open_clip_rank'):
        model, trainable = _trainable_after_locks(name, strict=False)
    expected = {n for n, _ in model.named_parameters() if n.startswith(OFFICIAL_TRAINABLE[name])}
    assert trainable == expected
    assert 'Image tower locked' in caplog.text and 'Text tower locked' in caplog.text


@pytest.mark.parametrize('name', sorted(OFFICIAL_TRAINABLE))
def test_strict_tower_lock_freezes_both_towers(name):
    model, trainable = _trainable_after_locks(name, strict=True)
    assert trainable == {n for n, _ in model.named_parameters() if n.startswith('adapter.')}


def test_locked_towers_get_no_gradient():
    model, _ = _trainable_after_locks('tiny-vit-adapter', strict=False)
    images, texts, targets = _batch('tiny-vit-adapter')
    out = model(images, texts)
    (out['rank_scores'].sum() + out['pair_logits'].sum()).backward()
    assert model.adapter.regressor.output_head.weight.grad is not None
    assert model.visual.proj.grad is not None and model.token_embedding.weight.grad is not None
    assert model.visual.conv1.weight.grad is None and model.transformer.resblocks[0].mlp.c_fc.weight.grad is None


def test_grad_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-vit-adapter')
    images, texts, _ = _batch('tiny-vit-adapter')
    model.eval()  # dropout off so both runs are deterministic

    def grads():
        model.zero_grad()
        out = model(images, texts)
        (out['rank_scores'].sum() + out['pair_logits'].square().sum()).backward()
        return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.set_grad_checkpointing(True)
    model.train()
    model.adapter.post_fuse_block.eval()  # keep dropout off; checkpointing is active in train mode
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)


def test_plain_openclip_models_unchanged():
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-vit')
    assert type(model) is open_clip.CLIP
    image_features, text_features, logit_scale = model(*_batch('tiny-vit-adapter')[:2])
    assert image_features.shape == (4, 32)


def test_initialises_what_the_original_leaves_uninitialised():
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-vit-adapter')
    projection = model.adapter.crossmodal_block.projection
    assert torch.isfinite(projection).all()
    assert 0.5 * 32 ** -0.5 < projection.std().item() < 1.5 * 32 ** -0.5


# --- bad input -------------------------------------------------------------------------------------

def _write_config(tmp_path, name, mutate):
    cfg = json.loads(json.dumps(open_clip.get_model_config('tiny-vit-adapter')))
    mutate(cfg)
    (tmp_path / f'{name}.json').write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path)
    return name


def test_unknown_adapter_key_is_named(tmp_path):
    name = _write_config(tmp_path, 'bad-key-adapter', lambda c: c['adapter_cfg'].update(n_regtokens=3))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['n_regtokens'\]"):
        open_clip.create_model(name)


def test_d_model_mismatch_is_named(tmp_path):
    name = _write_config(tmp_path, 'bad-width-adapter', lambda c: c['adapter_cfg'].update(d_model=48, n_head=4))
    with pytest.raises(ValueError, match=r"adapter_cfg.d_model=48 does not match the visual token width .* 32"):
        open_clip.create_model(name)


def test_unsupported_pooler_is_named(tmp_path):
    name = _write_config(tmp_path, 'bad-pool-adapter',
                         lambda c: c['adapter_cfg'].update(adapter_attention_pooler='mean'))
    with pytest.raises(ValueError, match="adapter_attention_pooler='mean' is not supported"):
        open_clip.create_model(name)


def test_checkpoint_for_wrong_config_names_key_and_shapes(tmp_path):
    fixture = torch.load(fixture_path('reference_adapter_resnet.pt'), weights_only=False)
    path = tmp_path / 'resnet_adapter.pt'
    torch.save(fixture['checkpoint'], path)
    with pytest.raises(CheckpointMismatchError, match=r"'\S+' expects shape \(\d+.*checkpoint has \("):
        open_clip.create_model('tiny-vit-adapter', pretrained=str(path))


def test_full_checkpoint_missing_adapter_keys_is_an_error(tmp_path):
    model = open_clip.create_model('tiny-vit-adapter')
    state = {f'module.{k}': v for k, v in model.state_dict().items() if 'regressor' not in k}
    path = tmp_path / 'partial.pt'
    torch.save({'epoch': 1, 'state_dict': state}, path)
    with pytest.raises(CheckpointMismatchError, match='missing keys: adapter.pair_regressor'):
        open_clip.create_model('tiny-vit-adapter', pretrained=str(path))


def test_round_trip_of_an_openclip_training_checkpoint(tmp_path):
    torch.manual_seed(1)
    model = open_clip.create_model('tiny-convnext-adapter')
    path = tmp_path / 'epoch_1.pt'
    torch.save({'epoch': 1, 'name': 'x', 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()},
                'optimizer': {}}, path)
    loaded = open_clip.create_model('tiny-convnext-adapter', pretrained=str(path))
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


# --- pretrained base weights ---------------------------------------------------------------------

def _write_base_weights(tmp_path):
    torch.manual_seed(3)
    base = open_clip.create_model('tiny-vit')
    path = tmp_path / 'tiny_vit_base.pt'
    torch.save(base.state_dict(), path)
    return base, path


def _assert_towers_loaded(model, base):
    state = model.state_dict()
    for key, value in base.state_dict().items():
        assert torch.equal(state[key], value), key


def test_base_weights_file_loads_towers_and_reports_fresh_adapter(tmp_path, caplog):
    base, path = _write_base_weights(tmp_path)
    with caplog.at_level(logging.INFO):
        model = open_clip.create_model('tiny-vit-adapter', pretrained=str(path))
    _assert_towers_loaded(model, base)
    assert 'start fresh: adapter.' in caplog.text


def test_pretrained_tag_of_derived_config_resolves_to_base_entry(tmp_path, monkeypatch, caplog):
    base, path = _write_base_weights(tmp_path)
    entry = {'url': 'https://example.invalid/tiny-vit.pt', 'hf_hub': '', 'mean': (0.5, 0.5, 0.5),
             'std': (0.25, 0.25, 0.25)}
    monkeypatch.setitem(oc_pretrained._PRETRAINED, 'tiny-vit', {'testtag': entry})
    register_derived_pretrained()
    assert open_clip.get_pretrained_cfg('tiny-vit-adapter', 'testtag') is entry
    assert ('tiny-vit-adapter', 'testtag') in open_clip.list_pretrained()

    requested = []

    def fake_download(cfg, *args, **kwargs):
        requested.append(cfg)
        return str(path)

    monkeypatch.setattr(open_clip.factory, 'download_pretrained', fake_download)
    with caplog.at_level(logging.INFO):
        model = open_clip.create_model('tiny-vit-adapter', pretrained='testtag')
    assert requested == [entry]
    _assert_towers_loaded(model, base)
    assert 'start fresh: adapter.' in caplog.text
    assert open_clip.get_model_preprocess_cfg(model)['mean'] == (0.5, 0.5, 0.5)
    monkeypatch.delitem(oc_pretrained._PRETRAINED, 'tiny-vit-adapter')


def test_shipped_derived_tags_resolve_to_base():
    for derived, base, tag in (('convnext_large_d_320-adapter', 'convnext_large_d_320', 'laion2b_s29b_b131k_ft_soup'),
                               ('ViT-B-16-adapter', 'ViT-B-16', 'laion2b_s34b_b88k'),
                               ('convnext_base_w_224-adapter', 'convnext_base_w', 'laion2b_s13b_b82k')):
        cfg = open_clip.get_pretrained_cfg(derived, tag)
        assert cfg and cfg is open_clip.get_pretrained_cfg(base, tag)


def test_local_dir_config_with_adapter_cfg_builds_and_loads(tmp_path):
    torch.manual_seed(4)
    trained = open_clip.create_model('tiny-vit-adapter')
    (tmp_path / 'open_clip_config.json').write_text(json.dumps(
        {'model_cfg': open_clip.get_model_config('tiny-vit-adapter'), 'preprocess_cfg': {}}))
    torch.save(trained.state_dict(), tmp_path / 'open_clip_pytorch_model.bin')
    model = open_clip.create_model(f'local-dir:{tmp_path}')
    assert isinstance(model, RankAdapterCLIP)
    for key, value in trained.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# --- OpenCLIP's forward contract and the official output names ---------------------------------------

def test_one_tower_forward_is_a_plain_clip_forward():
    """model(image=x) / model(text=t) on a rank model return what the same towers in a plain CLIP return."""
    torch.manual_seed(5)
    rank = open_clip.create_model('tiny-vit-adapter')
    plain = open_clip.create_model('tiny-vit')
    plain.load_state_dict({k: v for k, v in rank.state_dict().items() if k in plain.state_dict()})
    rank.eval(), plain.eval()
    images, texts, _ = _batch('tiny-vit-adapter')
    with torch.no_grad():
        image_features, text_features, logit_scale = rank(image=images)[0], rank(text=texts)[1], rank(image=images)[2]
        expected = plain(images, texts)
    torch.testing.assert_close(image_features, expected[0])
    torch.testing.assert_close(text_features, expected[1])
    torch.testing.assert_close(logit_scale, expected[2])
    rank.output_dict = True
    with torch.no_grad():
        out = rank(image=images)
    assert set(out) == {'image_features', 'text_features', 'logit_scale'} and out['text_features'] is None
    torch.testing.assert_close(out['image_features'], expected[0])


@pytest.mark.parametrize('name', ['tiny-convnext-adapter', 'tiny-customtext-adapter'])
def test_one_tower_forward_on_every_tower_kind(name):
    model = open_clip.create_model(name, output_dict=True).eval()
    images, texts, _ = _batch(name)
    with torch.no_grad():
        image_features = model(image=images)['image_features']
        text_features = model(text=texts)['text_features']
        tokens = model.encode_image_tokens(images)
    assert image_features.shape == (4, 32) and text_features.shape == (4, 32)
    torch.testing.assert_close(image_features.norm(dim=-1), torch.ones(4))
    if 'convnext' in name:  # an un-pooled timm trunk: pooled = global average of its map
        torch.testing.assert_close(image_features, torch.nn.functional.normalize(tokens.mean(dim=1), dim=-1))


@pytest.mark.parametrize('name', ['tiny-vit-adapter', 'tiny-customtext-adapter'])
def test_text_tokens_path_pools_as_openclips_encode_text(name):
    """encode_text_tokens restates OpenCLIP's encode_text to keep the token states: its pooled output must stay
    OpenCLIP's (a check that fails when OpenCLIP changes its text pooling or projection)."""
    torch.manual_seed(3)
    model = open_clip.create_model(name).eval()
    _, texts, _ = _batch(name)
    with torch.no_grad():
        pooled, tokens = model.encode_text_tokens(texts)
        torch.testing.assert_close(pooled, model.encode_text(texts))
    assert tokens.shape[:2] == texts.shape


def test_official_output_names_are_read_only_aliases():
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-vit-adapter').eval()
    images, texts, _ = _batch('tiny-vit-adapter')
    with torch.no_grad():
        out = model(images, texts)
    assert 'adapter_logits' not in out and 'adapter_paired_logits' not in out  # not entries: not iterated
    torch.testing.assert_close(out['adapter_logits'], out['rank_scores'].view(4, 1))
    paired = out['adapter_paired_logits']
    assert paired.shape == (16, 1)
    assert paired[1 * 4 + 3, 0] == out['pair_logits'][1, 3]  # row i*N + j: pair (i, j), as the official
    with pytest.raises(KeyError):
        out['image_features']  # the adapter's tokens are 'image_tokens'


def test_rank_outputs_flatten_like_dicts_for_ddp():
    """DDP routes outputs through torch's pytree: the output type must flatten to its tensors and back."""
    from torch.utils._pytree import tree_flatten, tree_unflatten
    model = open_clip.create_model('tiny-vit-adapter')
    out = model(*_batch('tiny-vit-adapter')[:2])
    leaves, spec = tree_flatten(out)
    assert len(leaves) == len(out) and all(isinstance(t, torch.Tensor) for t in leaves)
    rebuilt = tree_unflatten(leaves, spec)
    assert type(rebuilt) is type(out) and rebuilt['adapter_logits'].shape == (4, 1)
