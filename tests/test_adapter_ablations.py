"""The paper's adapter ablations as config values: what the original code can run builds, trains and loads here;
what it cannot run is one clear error naming why."""
import json

import pytest
import torch

import open_clip
from open_clip_rank.models.adapter import RankAdapterCLIP
from open_clip_rank.data.batches import RankTexts

pytestmark = pytest.mark.unit

BASE = json.loads(open(__import__('helpers').TEST_CONFIG_DIR / 'tiny-vit-adapter.json').read())


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


VARIANTS = {
    'null-pooler': {'adapter_attention_pooler': 'null'},
    'null-pooler-0-tokens': {'adapter_attention_pooler': 'null', 'n_reg_tokens': 0},
    'no-post-fusion': {'reg_token_method': 'null'},
}


@pytest.mark.parametrize('variant', sorted(VARIANTS))
def test_variant_checkpoint_round_trip_in_the_official_layout(variant, tmp_path):
    model = build(**VARIANTS[variant])
    folder = tmp_path / 'cfg'
    folder.mkdir()
    cfg = dict(BASE, adapter_cfg=dict(BASE['adapter_cfg'], **VARIANTS[variant]))
    (folder / f'tiny-{variant}-adapter.json').write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    path = tmp_path / 'epoch_1.pt'
    torch.save({'epoch': 1, 'name': 'x', 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
    loaded = open_clip.create_model(f'tiny-{variant}-adapter', pretrained=str(path)).eval()
    images, texts = _batch()
    for key in ('rank_scores', 'pair_logits'):
        assert torch.equal(loaded(images, texts)[key], model(images, texts)[key])
    rank_attn = tmp_path / 'rank_attn.pt'
    torch.save(build(n_reg_tokens=2).state_dict(), rank_attn)  # another variant's checkpoint
    with pytest.raises(ValueError, match='does not fit this model'):
        open_clip.create_model(f'tiny-{variant}-adapter', pretrained=str(rank_attn))
    # trains: forward and backward reach the heads
    out = build(**VARIANTS[variant]).train()(images, texts)
    (out['rank_scores'].sum() + out['pair_logits'].sum()).backward()


def test_reg_token_method_null_drops_the_post_fusion_encoder():
    model = build(reg_token_method='null')
    assert isinstance(model.adapter.post_fuse_block, torch.nn.Identity)
    images, texts = _batch()
    assert model(images, texts)['pair_logits'].shape == (5, 5)


@pytest.mark.parametrize('adapter, message', [
    ({'cross_attn_method': 'null'}, r"cross_attn_method='null' cannot run in the original code .* NotImplementedError"),
    ({'n_reg_tokens': 0}, r"n_reg_tokens=0 leaves the 'rank-attn' pooler without queries .* 'null'"),
    ({'adapter_attention_pooler': 'mean'}, r"adapter_attention_pooler='mean' is not supported"),
])
def test_variants_the_original_cannot_run_say_why(adapter, message):
    with pytest.raises(ValueError, match=message):
        build(**adapter)


OFFICIAL_POOLER_KEYS = {'query', 'attn.in_proj_weight', 'attn.in_proj_bias', 'attn.out_proj.weight',
                        'attn.out_proj.bias', 'ln_q.weight', 'ln_q.bias', 'ln_k.weight', 'ln_k.bias'}


def _official_pooled(pooler, x, normaliser):
    """The original's AttentionalPooler.forward (sequence-first, as written there) and, for 'sigmoid', its
    MultiheadAttentionDistributed math (multi_head_attention_forward with need_weights), eval mode."""
    x = pooler.ln_k(x).permute(1, 0, 2)  # NLD -> LND
    n = x.shape[1]
    q = pooler.ln_q(pooler.query).unsqueeze(1).expand(-1, n, -1)
    attn = pooler.attn
    if normaliser == 'softmax':
        out = attn(q, x, x, need_weights=False)[0]
    else:
        tgt_len, bsz, embed_dim = q.shape
        heads, head_dim = attn.num_heads, embed_dim // attn.num_heads
        w_q, w_k, w_v = attn.in_proj_weight.chunk(3)
        b_q, b_k, b_v = attn.in_proj_bias.chunk(3)
        qq = torch.nn.functional.linear(q, w_q, b_q).view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
        kk = torch.nn.functional.linear(x, w_k, b_k).view(x.shape[0], bsz * heads, head_dim).transpose(0, 1)
        vv = torch.nn.functional.linear(x, w_v, b_v).view(x.shape[0], bsz * heads, head_dim).transpose(0, 1)
        weights = torch.sigmoid(torch.bmm(qq * (1.0 / head_dim) ** 0.5, kk.transpose(-2, -1))) / heads
        out = torch.bmm(weights, vv).transpose(0, 1).contiguous().view(tgt_len * bsz, embed_dim)
        out = torch.nn.functional.linear(out, attn.out_proj.weight, attn.out_proj.bias).view(tgt_len, bsz, -1)
    return out.permute(1, 0, 2)  # LND -> NLD


@pytest.mark.parametrize('normaliser', ['softmax', 'sigmoid'])
@pytest.mark.parametrize('n_reg_tokens', [4, 0])
def test_per_image_poolers_are_the_original_forward_and_train(normaliser, n_reg_tokens):
    model = build(adapter_attention_pooler=normaliser, n_reg_tokens=n_reg_tokens)
    pooler_keys = {k[len('adapter.reg_token_pooler.'):] for k in model.state_dict()
                   if k.startswith('adapter.reg_token_pooler.')}
    assert pooler_keys == (OFFICIAL_POOLER_KEYS if n_reg_tokens else set())
    assert 'adapter.reg_tokens' not in model.state_dict() and not model.supports_pairwise
    images, texts = _batch()
    out = model(images, texts)
    assert 'pair_logits' not in out and out['rank_scores'].shape == (len(images),)
    adapter = model.adapter
    x = adapter.fuse(model.encode_image_tokens(images), model.encode_prompts(texts.tokens))
    # the original: x = reg_token_pooler(x).sum(1) (the token sum with 0 queries), score = regressor(x), no reg_ln
    pooled = _official_pooled(adapter.reg_token_pooler, x, normaliser) if n_reg_tokens else x
    torch.testing.assert_close(out['adapter_logits'], adapter.regressor(pooled.sum(dim=1)), rtol=1e-5, atol=1e-6)
    # trains with the single-head loss (pairs by score differences): a step moves the pooler and the head
    model.train()
    from open_clip_rank.losses.ranking import RankingLoss
    loss = RankingLoss(head='single', components=('regression', 'rank'))(**model(images, texts._replace(
        with_pairs=False)), output_dict=True)
    sum(loss.values()).backward()
    assert adapter.regressor.output_head.weight.grad.abs().sum() > 0
    if n_reg_tokens:
        assert adapter.reg_token_pooler.query.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in adapter.pair_regressor.parameters())  # no rank output uses it


def test_softmax_pooler_checkpoint_round_trip_and_no_dual_head(tmp_path):
    model = build(adapter_attention_pooler='softmax')
    folder = tmp_path / 'cfg'
    folder.mkdir()
    cfg = dict(BASE, adapter_cfg=dict(BASE['adapter_cfg'], adapter_attention_pooler='softmax'))
    (folder / 'tiny-softmax-adapter.json').write_text(json.dumps(cfg))
    open_clip.add_model_config(folder)
    path = tmp_path / 'epoch_1.pt'
    torch.save({'epoch': 1, 'name': 'x', 'state_dict': {f'module.{k}': v for k, v in model.state_dict().items()}}, path)
    loaded = open_clip.create_model('tiny-softmax-adapter', pretrained=str(path)).eval()
    images, texts = _batch()
    assert torch.equal(loaded(images, texts)['rank_scores'], model(images, texts)['rank_scores'])
    # the pair losses need a pair head: refused before training, with the way out
    from helpers import call_main, write_rank_csv
    from open_clip_train.main import main
    csv = write_rank_csv(str(tmp_path), per_count=2, name='train.csv')
    result = call_main(main, ['--model', 'tiny-softmax-adapter', '--dataset-type', 'csv', '--csv-dataset-sample-type',
                              'rank', '--train-data', csv, '--loss-opt', 'dual-head', '--name', 'x'], cwd=tmp_path)
    assert result.returncode == 2
    assert "--loss-opt dual-head needs the pair head" in result.stderr and '--loss-opt single-head' in result.stderr
    assert not (tmp_path / 'logs' / 'x').exists()


def test_pairwise_ranking_is_refused_without_a_pair_head():
    from open_clip_rank.inference import pairwise_scores
    model = build(adapter_attention_pooler='softmax')
    with pytest.raises(ValueError, match='this adapter model has no pair head; rank without --pairwise'):
        pairwise_scores(model, [], 'Rank the numbers of circle.', None, open_clip.get_tokenizer('tiny-vit-adapter'))
