"""The factorised pair head equals the official N*N concatenated-softmax form, without its memory."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from open_clip.transformer import LayerNorm
from open_clip_rank.models.adapter_layers import RankAwarePairAttention
from open_clip_rank.models.pair_reference import quadratic_pair_attention as official_pair_attention

pytestmark = pytest.mark.unit


@pytest.mark.parametrize('n,p,d,heads,q', [(5, 7, 32, 4, 3), (12, 16, 64, 8, 4), (1, 3, 16, 2, 2)])
def test_factorised_equals_official_form(n, p, d, heads, q):
    torch.manual_seed(n * 100 + p)
    module = RankAwarePairAttention(d, heads, LayerNorm).double()
    queries = torch.randn(q, d, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(n, p, d, dtype=torch.float64, requires_grad=True)
    ours = module(queries, tokens)
    ref = official_pair_attention(module, queries, tokens)
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    weights = torch.randn_like(ref)
    grads = torch.autograd.grad((ours * weights).sum(), (queries, tokens))
    ref_grads = torch.autograd.grad((ref * weights).sum(), (queries, tokens))
    for g, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


def test_diagonal_is_the_bias_only():
    # pair (i, i): both halves cancel, leaving Q * out_proj.bias, as in the official code
    module = RankAwarePairAttention(16, 2, LayerNorm)
    queries, tokens = torch.randn(3, 16), torch.randn(4, 5, 16)
    out = module(queries, tokens)
    for i in range(4):
        torch.testing.assert_close(out[i, i], 3 * module.out_proj.bias.detach(), rtol=1e-5, atol=1e-5)


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_pair_by_token_tensor_is_built():
    n, p, d, q = 96, 50, 32, 4  # D < N, so per-image [N, P, D] tensors stay below N*N*P
    module = RankAwarePairAttention(d, 4, LayerNorm)
    queries = torch.randn(q, d, requires_grad=True)
    tokens = torch.randn(n, p, d, requires_grad=True)
    with _LargestTensor() as probe:
        module(queries, tokens).square().sum().backward()
    assert probe.largest < n * n * p, f"a tensor of {probe.largest} elements appeared (N*N*P = {n * n * p})"
    with _LargestTensor() as official_probe:
        official_pair_attention(module, queries, tokens).square().sum().backward()
    assert official_probe.largest >= n * n * p  # the probe does see the official form's pair tensors


def test_bf16_close_to_float32():
    torch.manual_seed(0)
    module = RankAwarePairAttention(64, 8, LayerNorm)
    queries, tokens = torch.randn(4, 64), torch.randn(10, 20, 64)
    ref = official_pair_attention(module, queries, tokens)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        ours = module(queries, tokens)
    assert ours.dtype == torch.bfloat16
    assert (ours.float() - ref).abs().max() <= 0.03 * ref.abs().max()
