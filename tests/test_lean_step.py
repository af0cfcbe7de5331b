"""The adapter's lean training step computes what the plain formulas compute (issue 11, "Leaner training step").

``FusionBlock`` / ``PostFuseLayer`` run attention through ``F.scaled_dot_product_attention`` and recompute the MLP
activation in backward; here they are checked against an einsum restatement of the math, against the modules
they replace (OpenCLIP's ``ResidualAttentionBlock`` and PyTorch's ``nn.TransformerEncoderLayer`` forwards), and
``--grad-checkpointing`` against the plain step.
"""
from types import SimpleNamespace
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock
from open_clip_rank.models.adapter_layers import (
    AdapterCfg, FusionBlock, PostFuseLayer, RankAdapter, act_linear, attention_heads)

pytestmark = pytest.mark.unit

F32 = dict(rtol=1e-5, atol=1e-5)


def einsum_attention(attn: nn.MultiheadAttention, q_x, kv_x):
    """Multi-head attention written out: packed in-projection, softmax(q k^T / sqrt(d)) v, out-projection."""
    width, heads = q_x.shape[-1], attn.num_heads
    w_q, w_k, w_v = attn.in_proj_weight.split(width)
    b_q, b_k, b_v = attn.in_proj_bias.split(width)
    q = torch.einsum('nld,ed->nle', q_x, w_q) + b_q
    k = torch.einsum('nsd,ed->nse', kv_x, w_k) + b_k
    v = torch.einsum('nsd,ed->nse', kv_x, w_v) + b_v
    q, k, v = (t.unflatten(-1, (heads, -1)) for t in (q, k, v))  # [N, L, H, dh]
    scores = torch.einsum('nlhd,nshd->nhls', q, k) * q.shape[-1] ** -0.5
    out = torch.einsum('nhls,nshd->nlhd', scores.softmax(dim=-1), v).flatten(2)
    return torch.einsum('nle,de->nld', out, attn.out_proj.weight) + attn.out_proj.bias


def einsum_block(block, x, text=None):
    kv = x if text is None else block.ln_1_kv(text)
    h = block.ln_1(x)
    x = x + einsum_attention(block.attn, h, h if text is None else kv)
    h = torch.einsum('nld,ed->nle', block.ln_2(x), block.mlp.c_fc.weight) + block.mlp.c_fc.bias
    return x + torch.einsum('nle,de->nld', block.mlp.gelu(h), block.mlp.c_proj.weight) + block.mlp.c_proj.bias


def _grads(out, params, weights):
    return torch.autograd.grad((out * weights).sum(), params, retain_graph=True)


@pytest.mark.parametrize('cross', [False, True])
@pytest.mark.parametrize('act', [nn.GELU, QuickGELU])
def test_fusion_block_equals_einsum_math_and_openclip_block(cross, act):
    torch.manual_seed(int(cross) + 2 * (act is QuickGELU))
    block = FusionBlock(32, 4, act_layer=act, norm_layer=LayerNorm, is_cross_attention=cross)
    x = torch.randn(3, 7, 32, requires_grad=True)
    text = torch.randn(3, 5, 32, requires_grad=True) if cross else None
    inputs = [x] + ([text] if cross else []) + list(block.parameters())
    ours = block(x, text, text) if cross else block(x)
    weights = torch.randn_like(ours)
    for ref in (einsum_block(block, x, text),
                ResidualAttentionBlock.forward(block, x, k_x=text, v_x=text) if cross
                else ResidualAttentionBlock.forward(block, x)):
        torch.testing.assert_close(ours, ref, **F32)
        for g, rg in zip(_grads(ours, inputs, weights), _grads(ref, inputs, weights)):
            torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)


def test_attention_uses_the_fused_kernel_without_dropout():
    attn = nn.MultiheadAttention(32, 4, batch_first=True)
    x = torch.randn(2, 6, 32, requires_grad=True)
    out = attention_heads(attn, x, x)
    names, seen, stack = set(), set(), [out.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is not None and fn not in seen:
            seen.add(fn)
            names.add(type(fn).__name__)
            stack += [f for f, _ in fn.next_functions]
    assert any('FlashAttention' in name or 'EfficientAttention' in name for name in names), names
    torch.testing.assert_close(out, attn(x, x, x, need_weights=False)[0], **F32)


@pytest.mark.parametrize('act', [nn.GELU(), nn.GELU(approximate='tanh'), QuickGELU()], ids=['gelu', 'tanh', 'quick'])
def test_act_linear_gradients(act):
    # nn.GELU's backward goes through its kernel (no act(h) buffer), QuickGELU through autograd
    torch.manual_seed(0)
    linear = nn.Linear(6, 4).double()
    h = torch.randn(5, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w, b: act_linear(h, act, _Lin(w, b)),
                                    (h, linear.weight, linear.bias))


class _Lin(nn.Module):
    def __init__(self, weight, bias):
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, x):
        return F.linear(x, self.weight, self.bias)


def test_act_linear_under_bf16_autocast_matches_linear():
    torch.manual_seed(0)
    linear = nn.Linear(16, 8)
    h = torch.randn(4, 16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours = act_linear(h, nn.GELU(), linear)
        ref = linear(F.gelu(h))
    assert ours.dtype == ref.dtype == torch.bfloat16
    torch.testing.assert_close(ours, ref)
    weights = torch.randn(4, 8)
    params = (h, linear.weight, linear.bias)
    for g, rg in zip(_grads(ours.float(), params, weights), _grads(ref.float(), params, weights)):
        assert g.dtype == rg.dtype
        torch.testing.assert_close(g, rg, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize('training', [False, True])
def test_post_fuse_layer_equals_transformer_encoder_layer(training):
    torch.manual_seed(0)
    layer = PostFuseLayer(d_model=32, nhead=4, dim_feedforward=32, dropout=0.1, batch_first=True).train(training)
    x = torch.randn(3, 7, 32, requires_grad=True)
    inputs = [x] + list(layer.parameters())
    torch.manual_seed(1)
    ours = layer(x)
    torch.manual_seed(1)  # same random state: the dropout masks draw the same numbers on both paths
    ref = nn.TransformerEncoderLayer.forward(layer, x)
    torch.testing.assert_close(ours, ref, **F32)
    weights = torch.randn_like(ours)
    for g, rg in zip(_grads(ours, inputs, weights), _grads(ref, inputs, weights)):
        torch.testing.assert_close(g, rg, rtol=1e-4, atol=1e-5)


def _adapter():
    cfg = AdapterCfg(num_layers=2, d_model=32, n_head=4, num_learnable_text_tokens=3, n_reg_tokens=4,
                     fusion_heads=4, pair_heads=4)
    return RankAdapter(cfg)


@pytest.mark.parametrize('dropout', [False, True])
def test_grad_checkpointing_gives_the_same_gradients(dropout):
    torch.manual_seed(0)
    adapter = _adapter().train()
    if not dropout:
        adapter.post_fuse_block.eval()
    images, texts = torch.randn(5, 6, 32, requires_grad=True), torch.randn(5, 4, 32, requires_grad=True)

    def run(ckpt):
        adapter.set_grad_checkpointing(ckpt)
        adapter.zero_grad(set_to_none=True)
        images.grad = texts.grad = None
        torch.manual_seed(123)  # checkpointing restores the random state on recompute: same dropout masks
        scores, pairs = adapter(images, texts)
        (scores.square().sum() + pairs.sin().sum()).backward()
        grads = {k: p.grad.clone() for k, p in adapter.named_parameters() if p.grad is not None}
        grads.update(scores=scores.detach(), pairs=pairs.detach(), images=images.grad.clone(), texts=texts.grad.clone())
        return grads

    plain, checkpointed = run(False), run(True)
    assert plain.keys() == checkpointed.keys()
    for key in plain:
        torch.testing.assert_close(checkpointed[key], plain[key], rtol=1e-5, atol=1e-6)
    adapter.set_grad_checkpointing(True)
    assert adapter.crossmodal_block.grad_checkpointing and adapter.post_fuse_block.grad_checkpointing


def test_state_dict_names_are_unchanged():
    # official checkpoints load key for key: the lean classes add no parameters and rename none
    adapter = _adapter()
    reference = {k: v.shape for k, v in adapter.state_dict().items()}
    for block in list(adapter.crossmodal_block.resblocks) + list(adapter.crossmodal_block.cross_attn):
        assert type(block).__mro__[1] is ResidualAttentionBlock
    assert isinstance(adapter.post_fuse_block.layers[0], nn.TransformerEncoderLayer)
    assert 'crossmodal_block.cross_attn.0.ln_1_kv.weight' in reference
    assert 'post_fuse_block.layers.1.self_attn.in_proj_weight' in reference


@pytest.mark.parametrize('ckpt', [False, True])
def test_text_side_once_per_distinct_text_gives_the_same_values_and_gradients(ckpt):
    # a rank batch shares one instruction (and its negatives' re-worded one): the fusion's text LayerNorm and
    # key/value projections run on the U distinct texts, gathered per image; values and gradients (the gather's
    # backward sums the images' contributions into their text) equal one text row per image
    # (float64, so that the different summation order of the shared path is far below the tolerance)
    torch.manual_seed(0)
    adapter = _adapter().double().train()
    adapter.post_fuse_block.eval()  # no dropout: both runs see the same function
    adapter.set_grad_checkpointing(ckpt)
    images = torch.randn(5, 6, 32, dtype=torch.float64, requires_grad=True)
    distinct = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    index = torch.tensor([0, 1, 0, 0, 1])

    def run(texts, text_index):
        adapter.zero_grad(set_to_none=True)
        images.grad = distinct.grad = None
        scores, pairs = adapter(images, texts, text_index=text_index)
        (scores.square().sum() + pairs.sin().sum()).backward()
        grads = {k: p.grad.clone() for k, p in adapter.named_parameters() if p.grad is not None}
        grads.update(scores=scores.detach(), pairs=pairs.detach(), images=images.grad.clone(),
                     texts=distinct.grad.clone())
        return grads

    def assert_same(ours, ref):
        assert ours.keys() == ref.keys()
        for key in ref:
            torch.testing.assert_close(ours[key], ref[key], rtol=1e-10, atol=1e-12)

    assert_same(run(distinct, index), run(distinct[index], None))
    # one text for every image: a [1, T, D] row is broadcast (no index, no copy)
    assert_same(run(distinct[:1], None), run(distinct[:1].expand(5, -1, -1), None))
    with pytest.raises(ValueError, match='2 key/value rows for 5 query rows'):
        adapter(images, distinct)


def test_rank_forward_encodes_each_distinct_caption_once():
    import open_clip
    import open_clip_rank  # noqa: F401
    from open_clip_rank.data.batches import RankTexts
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-vit-adapter').eval()
    seen = []
    encode = model.encode_text_tokens
    model.encode_text_tokens = lambda text: (seen.append(text.shape[0]), encode(text))[1]
    tokens = torch.randint(1, 100, (2, 16))
    batch = RankTexts(tokens[torch.tensor([0, 0, 1, 0])], torch.arange(4.), torch.zeros(4, dtype=torch.long))
    images = torch.randn(4, 3, 32, 32)
    out = model(images, batch)
    assert seen == [2]
    model.encode_text_tokens = encode
    features, text_tokens = encode(batch.tokens)
    torch.testing.assert_close(out['text_features'], features)
    scores, pairs = model.adapter(model.encode_image_tokens(images), text_tokens)
    torch.testing.assert_close(out['rank_scores'], scores, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out['pair_logits'], pairs, rtol=1e-5, atol=1e-6)


def _counting_text_encoder(model):
    calls = []
    encode = model.encode_text_tokens
    model.encode_text_tokens = lambda text: (calls.append(text.shape[0]), encode(text))[1]
    return calls, encode


def test_frozen_text_tower_is_encoded_once_per_caption_while_it_cannot_change():
    import open_clip
    import open_clip_rank  # noqa: F401
    from open_clip_rank.integration.run_state import end_run, start_run
    from open_clip_rank.data.batches import RankTexts
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-vit-adapter').train()
    start_run(SimpleNamespace(strict_tower_lock=True))  # --strict-tower-lock: the whole text tower frozen
    try:
        model.lock_text_tower()
    finally:
        end_run()
    model.adapter.eval()  # no adapter dropout: scores comparable between calls (the text tower stays in train mode)
    calls, encode = _counting_text_encoder(model)
    captions = torch.randint(1, 100, (2, 16))
    images = torch.randn(4, 3, 32, 32)

    def batch(rows):
        return RankTexts(captions[torch.tensor(rows)], torch.arange(len(rows), dtype=torch.float32),
                         torch.zeros(len(rows), dtype=torch.long))

    first = model(images, batch([0, 0, 1, 0]))
    second = model(images[:2], batch([1, 1]))
    assert calls == [2]  # the second batch's caption came from the memo
    torch.testing.assert_close(second['text_features'], encode(captions[[1, 1]])[0])
    torch.testing.assert_close(first['rank_scores'][:2], model(images[:2], batch([0, 0]))['rank_scores'])
    # weights written in place (load_state_dict, an optimizer step): the memo is dropped, values recomputed
    with torch.no_grad():
        model.ln_final.weight.mul_(2.0)
    calls.clear()
    after = model(images[:2], batch([1, 1]))
    assert calls == [1]
    torch.testing.assert_close(after['text_features'], encode(captions[[1, 1]])[0])
    assert not torch.allclose(after['text_features'], second['text_features'])


def test_trainable_text_tower_is_never_memoised():
    import open_clip
    import open_clip_rank  # noqa: F401
    from open_clip_rank.data.batches import RankTexts
    torch.manual_seed(0)
    model = open_clip.create_model('tiny-vit-adapter').train()
    model.lock_text_tower()  # the original lock: token embedding, positional embedding and ln_final train
    calls, _ = _counting_text_encoder(model)
    texts = RankTexts(torch.randint(1, 100, (1, 16)).expand(3, -1), torch.arange(3.), torch.zeros(3, dtype=torch.long))
    for _ in range(2):
        out = model(torch.randn(3, 3, 32, 32), texts)
    assert calls == [1, 1]
    (out['rank_scores'].sum() + out['pair_logits'].sum()).backward()
    assert model.token_embedding.weight.grad is not None and model.token_embedding.weight.grad.abs().sum() > 0
