"""The paper's adapter ablations as config values: what the original code can run builds, trains and loads here;
what it cannot run is one clear error naming why."""
import json

import pytest
import torch

import open_clip
from open_clip_rank.models.adapter import RankAdapterCLIP
from open_clip_rank.models.base import RankTexts

BASE = json.loads(open(__import__('conftest').TEST_CONFIG_DIR / 'tiny-vit-adapter.json').read())


def build(**adapter):
    torch.manual_seed(0)
    cfg = dict(BASE['adapter_cfg'], **adapter)
    return RankAdapterCLIP(BASE['embed_dim'], BASE['vision_cfg'], BASE['text_cfg'], adapter_cfg=cfg,
                           misc_cfg=BASE['misc_cfg']).eval()


def _batch(n=5):
    torch.manual_seed(1)
    images = torch.randn(n, 3, 32, 32)
    tokens = open_clip.tokenize(['Rank the numbers of circle.'] * n, context_length=16)
    return images, RankTexts(tokens, torch.arange(n, dtype=torch.float32), torch.zeros(n, dtype=torch.long))


@pytest.mark.parametrize('n_reg_tokens', [4, 0])
def test_null_pooler_is_the_original_mean_difference_pair_head(n_reg_tokens):
    model = build(adapter_attention_pooler='null', n_reg_tokens=n_reg_tokens)
    assert not any(k.startswith(('adapter.reg_tokens', 'adapter.reg_token_pooler')) for k in model.state_dict())
    images, texts = _batch()
    out = model(images, texts)
    n = len(images)
    assert out['rank_scores'].shape == (n,) and out['pair_logits'].shape == (n, n)
    # the original forward, restated: x_pair_diff = (x.unsqueeze(1) - x.unsqueeze(0)).view(N*N, L, D).mean(1)
    adapter = model.adapter
    x = adapter.fuse(model.encode_image_tokens(images), model.encode_prompts(texts.tokens))
    pair = (x.unsqueeze(1) - x.unsqueeze(0)).view(n * n, x.shape[1], x.shape[2]).mean(dim=1)
    torch.testing.assert_close(out['adapter_paired_logits'], adapter.pair_regressor(pair), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['adapter_logits'], adapter.regressor(adapter.reg_ln(x).sum(dim=1)))
    (out['rank_scores'].sum() + out['pair_logits'].sum()).backward()
    assert adapter.pair_regressor.output_head.weight.grad is not None


def test_null_pooler_checkpoint_round_trip_in_the_official_layout(tmp_path):
    model = build(adapter_attention_pooler='null')
    folder = tmp_path / 'cfg'
    folder.mkdir()
    cfg = dict(BASE, adapter_cfg=dict(BASE['adapter_cfg'], adapter_attention_pooler='null'))
    (folder / 'tiny-null-adapter.json').write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    path = tmp_path / 'epoch_1.pt'
    torch.save({'epoch': 1, 'name': 'x', 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
    loaded = open_clip.create_model('tiny-null-adapter', pretrained=str(path)).eval()
    images, texts = _batch()
    assert torch.equal(loaded(images, texts)['pair_logits'], model(images, texts)['pair_logits'])
    rank_attn = tmp_path / 'rank_attn.pt'
    torch.save(build().state_dict(), rank_attn)
    with pytest.raises(ValueError, match='does not fit this model'):
        open_clip.create_model('tiny-null-adapter', pretrained=str(rank_attn))


def test_reg_token_method_null_drops_the_post_fusion_encoder():
    model = build(reg_token_method='null')
    assert isinstance(model.adapter.post_fuse_block, torch.nn.Identity)
    images, texts = _batch()
    assert model(images, texts)['pair_logits'].shape == (5, 5)


@pytest.mark.parametrize('adapter, message', [
    ({'cross_attn_method': 'null'}, r"cross_attn_method='null' cannot run in the original code .* NotImplementedError"),
    ({'adapter_attention_pooler': 'softmax'}, r"'softmax' cannot run in the original code .* not in the released"),
    ({'adapter_attention_pooler': 'sigmoid'}, r"'sigmoid' cannot run in the original code"),
    ({'n_reg_tokens': 0}, r"n_reg_tokens=0 leaves the 'rank-attn' pooler without queries .* 'null'"),
    ({'adapter_attention_pooler': 'mean'}, r"adapter_attention_pooler='mean' is not supported"),
])
def test_variants_the_original_cannot_run_say_why(adapter, message):
    with pytest.raises(ValueError, match=message):
        build(**adapter)
