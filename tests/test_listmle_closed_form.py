"""ListMLE with its closed-form gradient (``list_mle``, the shipped path) against the autograd statement it replaced
(``list_mle_autograd``) and float64: values and gradients, ties, logit scale 100, the 1e-10 floor, bf16 inputs,
transposed and rectangular (``--local-loss``) matrices, blocks and threads; the RankCLIP loss built on it (Gram
in-modal similarities, column softmax) against the same loss on the autograd ListMLE."""
import math

import pytest
import torch

from open_clip_rank.losses import listmle, rankclip
from open_clip_rank.losses.listmle import list_mle, list_mle_autograd, tie_permutation

pytestmark = pytest.mark.unit


def _float64_truth(scores, targets, permutation, eps=1e-10):
    """The released definition in float64 (targets sorted in tie-break order, floor inside the log)."""
    order_in_perm = targets.double()[:, permutation].sort(dim=1, descending=True, stable=True).indices
    order = permutation[order_in_perm]
    ranked = scores.double().gather(1, order)
    shifted = ranked - ranked.max(dim=1, keepdim=True).values
    tails = torch.logaddexp(torch.logcumsumexp(shifted.flip(1), dim=1).flip(1),
                            torch.full_like(shifted, math.log(eps)))
    return (tails - shifted).sum(1).mean()


def _similarities(rows, cols, seed=0, duplicate=True, scale=100.0):
    generator = torch.Generator().manual_seed(seed)
    a = torch.nn.functional.normalize(torch.randn(rows, 16, generator=generator), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(cols, 16, generator=generator), dim=-1)
    if duplicate and cols > 3:
        b[1] = b[0]  # duplicated items: exact ties in targets and in each row's maximum
        b[3] = b[2]
    return scale * a @ b.T, scale * torch.nn.functional.normalize(a + 0.5 * torch.randn(a.shape, generator=generator),
                                                                  dim=-1) @ b.T


def _both(scores, targets, permutation, eps=listmle.DEFAULT_EPS):
    fast_in = scores.detach().clone().requires_grad_()
    slow_in = scores.detach().clone().requires_grad_()
    fast = list_mle(fast_in, targets, permutation, eps)
    slow = list_mle_autograd(slow_in, targets, permutation, eps)
    fast.backward()
    slow.backward()
    return fast, slow, fast_in.grad, slow_in.grad


@pytest.mark.parametrize('rows,cols', [(24, 24), (8, 40), (40, 8), (1, 2)])
@pytest.mark.parametrize('with_permutation', [True, False])
def test_values_and_gradients_equal_the_autograd_statement(rows, cols, with_permutation):
    scores, targets = _similarities(rows, cols)
    targets = targets.round()  # many ties besides the duplicated columns
    permutation = tie_permutation(cols, (0, 1, 2, 3)) if with_permutation else None
    fast, slow, fast_grad, slow_grad = _both(scores, targets, permutation)
    torch.testing.assert_close(fast, slow, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-5, atol=2e-5)
    assert fast_grad.dtype == torch.float32


def test_more_accurate_than_the_autograd_statement_against_float64():
    scores, targets = _similarities(64, 64, seed=3)
    permutation = tie_permutation(64, (1,))
    truth_in = scores.double().requires_grad_()
    truth = _float64_truth(truth_in, targets, permutation)
    truth.backward()
    fast, slow, fast_grad, slow_grad = _both(scores, targets, permutation)
    fast_error = (fast_grad.double() - truth_in.grad).abs().max()
    slow_error = (slow_grad.double() - truth_in.grad).abs().max()
    assert fast_error <= slow_error + 1e-9
    assert abs(float(fast) - float(truth)) <= abs(float(slow) - float(truth)) + 1e-4


def test_the_floor_is_kept():
    scores, targets = _similarities(16, 16, seed=4, scale=100.0)  # rows span far more than 23 nats
    permutation = torch.arange(16)
    with_floor = list_mle(scores, targets, None)
    torch.testing.assert_close(with_floor.double(), _float64_truth(scores, targets, permutation), rtol=1e-6, atol=1e-4)
    assert abs(float(with_floor) - float(_float64_truth(scores, targets, permutation, eps=1e-30))) > 1e-3
    with pytest.raises(ValueError, match='eps must be > 0'):
        list_mle(scores, targets, None, eps=0.0)


def test_ties_in_a_rows_maximum_route_the_shift_gradient_as_autograd_does():
    scores = torch.tensor([[5.0, 5.0, 1.0, -60.0, -80.0], [2.0, -90.0, 2.0, 2.0, 0.0]])
    targets = torch.tensor([[0.0, 3.0, 2.0, 1.0, 0.5], [1.0, 1.0, 1.0, 2.0, 0.0]])
    for permutation in (None, torch.tensor([4, 2, 0, 1, 3])):
        fast, slow, fast_grad, slow_grad = _both(scores, targets, permutation)
        torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-5, atol=1e-5)


def test_signed_zeros_tie_and_extreme_values_order():
    targets = torch.tensor([[0.0, -0.0, 1.0, -1.0, 1e-45, -1e-45, 3.4e38, -3.4e38]])
    order = listmle._descending_order(targets, listmle._low_bits(listmle._tie_positions(None, 8, 'cpu')), None)
    assert order.tolist() == [[6, 2, 4, 0, 1, 5, 3, 7]]  # +0.0 and -0.0 tie: column order


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    scores, targets = _similarities(32, 32, seed=5)
    permutation = tie_permutation(32, (2,))
    fast_in = scores.to(dtype).requires_grad_()
    fast = list_mle(fast_in, targets.to(dtype), permutation)
    fast.backward()
    slow_in = scores.to(dtype).requires_grad_()
    slow = list_mle_autograd(slow_in, targets.to(dtype), permutation)
    slow.backward()
    assert fast.dtype == torch.float32 and fast_in.grad.dtype == dtype
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast_in.grad.float(), slow_in.grad.float(), rtol=2e-2, atol=2e-2)


def test_transposed_inputs_blocks_and_threads(monkeypatch):
    scores, targets = _similarities(300, 300, seed=6)
    permutation = tie_permutation(300, (3,))
    reference = _both(scores.T, targets.T, permutation)
    monkeypatch.setattr(listmle, 'BLOCK_ELEMENTS', 300 * 70)  # 5 blocks of rows
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)  # the numpy sort split over threads (rows >= 128 per block)
        monkeypatch.setattr(listmle, 'BLOCK_ELEMENTS', 300 * 150)
        fast_in = scores.detach().clone().requires_grad_()
        fast = list_mle(fast_in.T, targets.T, permutation)
        fast.backward()
    finally:
        torch.set_num_threads(threads)
    torch.testing.assert_close(fast, reference[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_in.grad.T, reference[3], rtol=1e-5, atol=2e-5)
    assert reference[2].T.is_contiguous()  # the gradient of a transposed matrix comes back in its layout


def test_more_than_65536_items_take_the_wide_keys():
    generator = torch.Generator().manual_seed(7)
    scores = 30 * torch.randn(2, 70_000, generator=generator)
    targets = (30 * torch.randn(2, 70_000, generator=generator)).round()
    permutation = tie_permutation(70_000, (4,))
    fast, slow, fast_grad, slow_grad = _both(scores, targets, permutation)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(fast_grad, slow_grad, rtol=1e-4, atol=1e-4)


def _rankclip_outputs(monkeypatch, autograd, image, text, scale, autocast=None):
    if autograd:
        monkeypatch.setattr(rankclip, 'list_mle', list_mle_autograd)
        monkeypatch.setattr(rankclip, 'similarities',
                            lambda rows, cols, s: s * rows @ cols.T)  # the matrix product as autograd sees it
    image = image.detach().clone().requires_grad_()
    text = text.detach().clone().requires_grad_()
    scale = scale.detach().clone().requires_grad_()
    loss = rankclip.RankCLIPLoss(seed=1)
    loss.set_epoch(10, 10)
    with (torch.autocast('cpu', dtype=autocast) if autocast else torch.autocast('cpu', enabled=False)):
        out = loss(image, text, scale, output_dict=True)
    sum(out.values()).backward()
    monkeypatch.undo()
    return out, image.grad, text.grad, scale.grad


@pytest.mark.parametrize('autocast', [None, torch.bfloat16])
def test_rankclip_loss_equals_the_one_on_autograd_listmle(monkeypatch, autocast):
    generator = torch.Generator().manual_seed(8)
    image = torch.nn.functional.normalize(torch.randn(48, 32, generator=generator), dim=-1)
    text = torch.nn.functional.normalize(image + 0.7 * torch.randn(48, 32, generator=generator), dim=-1)
    text[5] = text[4]  # a repeated caption
    scale = torch.tensor(100.0)
    fast = _rankclip_outputs(monkeypatch, False, image, text, scale, autocast)
    slow = _rankclip_outputs(monkeypatch, True, image, text, scale, autocast)
    tolerance = dict(rtol=1e-5, atol=1e-5) if autocast is None else dict(rtol=3e-2, atol=3e-2)
    for key in slow[0]:
        torch.testing.assert_close(fast[0][key].float(), slow[0][key].float(), **tolerance)
    for fast_grad, slow_grad in zip(fast[1:], slow[1:]):
        torch.testing.assert_close(fast_grad, slow_grad, **tolerance)


def test_gram_similarities_equal_the_matrix_product():
    generator = torch.Generator().manual_seed(9)
    x = torch.randn(12, 8, generator=generator, requires_grad=True)
    scale = torch.tensor(50.0, requires_grad=True)
    weights = torch.randn(12, 12, generator=generator)
    gram = (rankclip.similarities(x, x, scale) * weights).sum()
    plain = (scale * x @ x.T * weights).sum()
    torch.testing.assert_close(gram, plain)
    grads = torch.autograd.grad(gram, (x, scale))
    expected = torch.autograd.grad(plain, (x, scale))
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
