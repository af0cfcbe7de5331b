"""ListMLE (Xia et al., 2008), numerically stable, with the semantics of RankCLIP's released ``list_MLE``.

For one row of predictions ``s`` and one row of targets ``t`` (the items ordered by ``t``, descending:
``pi``), the loss is  sum_j [ log(sum_{k >= j} exp(s_pi(k) - m) + eps) - (s_pi(j) - m) ]  with ``m`` the
row's largest prediction; the batch loss is the mean over rows. The ``+ eps`` (1e-10) inside the log is
part of the released definition: once a row's scores span more than ~23 nats (RankCLIP's similarity rows at
logit scale 100 do), the tail sums of the lowest-ranked items fall below ``eps`` and the floor changes
the value. Here the log of the tail sums comes from ``logcumsumexp`` and the floor is added as
``logaddexp(log_tail, log(eps))``: the same function, with no exp/log round trip that under- or overflows.

Ties in the targets are broken by one random permutation of the columns shared by all rows (the released
code shuffles the columns with a fresh ``torch.randperm`` before its sort). Here the permutation is an
argument, so the caller decides how it is drawn (``tie_permutation``: seeded, the same on every DDP rank).
The released code also drops items whose target equals exactly -1 (padding of its learning-to-rank
library); similarity rows have no padding, so that mask is not reproduced.

``list_mle`` computes it with its closed-form gradient (``_ListMLE``, below) instead of autograd through
``logcumsumexp``: per row, with the items in target order, ``T_j = sum_{k >= j} exp(s_k - m)`` (the suffix
normalisers) and

    loss = sum_j [log(T_j + eps) - (s_j - m)]
    d loss / d s_i = exp(s_i - m) * sum_{j <= i} 1 / (T_j + eps) - 1   (+ sum_j eps / (T_j + eps) at the row max,
                                                                          whose shift m the floor does not cancel)

two cumulative sums. The gradient is formed in the forward pass, block of rows by block of rows, and only it is
kept for the backward ([R, N] float32, scattered back to the scores' columns): no [R, N] intermediates of autograd.
The row order comes from ONE sort of packed int64 keys (the target's float bits made order-preserving in the high
32 bits, the column's tie-break position in the low 32), which gives the descending target order with ties broken
by the permutation; on the CPU numpy's SIMD sort does it (several times faster than ``torch.sort``), elsewhere
``torch.sort``. ``list_mle_autograd`` is the plain autograd statement of the same loss, the reference the tests
and ``scripts/benchmark_rankclip.py`` hold it against.
"""
import math
from typing import Optional, Sequence

import numpy as np
import torch

DEFAULT_EPS = 1e-10
BLOCK_ELEMENTS = 1 << 20  # rows are processed in blocks of about this many items (bounded temporaries)
_LOW32 = 0xFFFFFFFF


def tie_permutation(size: int, seed: Sequence[int], device=None) -> torch.Tensor:
    """A permutation of ``range(size)`` that depends only on ``seed`` (a tuple of ints): every process
    that passes the same seed gets the same permutation, whatever its global RNG state."""
    generator = torch.Generator()
    generator.manual_seed(hash(tuple(int(s) for s in seed)) % (2 ** 63))
    return torch.randperm(size, generator=generator).to(device)


def _check_shapes(scores, targets):
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(f"list_mle needs scores and targets of the same shape [rows, items], got "
                         f"{tuple(scores.shape)} and {tuple(targets.shape)}.")


def list_mle(scores: torch.Tensor, targets: torch.Tensor, permutation: Optional[torch.Tensor] = None,
             eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Mean over rows of the ListMLE loss of ``scores`` [R, N] ranked by ``targets`` [R, N].

    ``targets`` only set the order and carry no gradient. ``permutation`` [N]: the tie-break order of the
    columns (ties in a row go in the order the columns appear in the permutation); None: ties keep column
    order. Computed in float32/float64 whatever the input dtype (autocast off), so bf16/fp16 inputs give finite
    values and gradients; the gradient comes back in the scores' dtype. ``eps`` must be > 0: the floor is part of
    the released definition (and keeps every ``1 / (T_j + eps)`` of the closed form finite).
    """
    _check_shapes(scores, targets)
    if not eps > 0:
        raise ValueError(f"list_mle's floor eps must be > 0 (the released definition uses 1e-10), got {eps}.")
    return _ListMLE.apply(scores, targets.detach(), permutation, float(eps))


def _tie_positions(permutation: Optional[torch.Tensor], size: int, device) -> torch.Tensor:
    """[N] int64: the position of each column in the tie-break order."""
    positions = torch.arange(size, device=device)
    if permutation is None:
        return positions
    return torch.empty_like(positions).scatter_(0, permutation.to(device), positions)


def _low_bits(positions: torch.Tensor) -> torch.Tensor:
    """[N] the low 32 bits of each column's key: ``position << 16 | column`` when N <= 65536 (the column rides
    along, so the sort gives it directly), else the position."""
    size = positions.shape[0]
    return positions << 16 | torch.arange(size, device=positions.device) if size <= 1 << 16 else positions


def _sort_rows_numpy(floats: np.ndarray, low: np.ndarray, out: np.ndarray) -> None:
    """``out`` [b, N] int64: each row's columns in descending order of ``floats``, as ``_descending_order``."""
    bits = floats.view(np.int32)
    sign = bits >> 31  # -1 for negative floats (and -0.0), else 0
    # IEEE sign-magnitude -> an order-preserving int; "- sign" moves the negatives up by one so -0.0 ties +0.0
    ascending = (bits ^ (sign & np.int32(0x7FFFFFFF))) - sign
    np.left_shift(~ascending, 32, out=out, dtype=np.int64)  # ~: descending, in the high 32 bits
    out |= low
    out.sort(axis=1)  # keys are unique within a row: no stability needed
    np.bitwise_and(out, 0xFFFF if len(low) <= 1 << 16 else _LOW32, out=out)


_pool = None


def _numpy_threads(rows: int) -> int:
    """numpy sorts in the calling thread: split large blocks over torch's intra-op thread count (numpy releases the
    GIL while it sorts), so the sort scales with threads as the torch ops around it do."""
    return min(torch.get_num_threads(), rows // 64) if rows >= 128 else 1


def _descending_order(targets: torch.Tensor, low: torch.Tensor,
                      permutation: Optional[torch.Tensor]) -> torch.Tensor:
    """Column indices [b, N] of each row in descending target order, ties by tie-break position: one sort of unique
    int64 keys (high 32 bits: the target's float bits as an order-reversing int; low 32: ``_low_bits``). On the CPU
    numpy's integer ops and SIMD sort do it (several times faster than torch's), elsewhere ``torch.sort``."""
    global _pool
    size = targets.shape[1]
    floats = targets.float().contiguous()
    if floats.device.type == 'cpu':
        order = torch.empty(floats.shape, dtype=torch.long)
        array, values, low_bits = order.numpy(), floats.numpy(), low.numpy()
        threads = _numpy_threads(len(array))
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor
            if _pool is None or _pool._max_workers < threads:
                _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix='listmle-sort')
            bounds = np.linspace(0, len(array), threads + 1).astype(int)
            list(_pool.map(lambda i: _sort_rows_numpy(values[bounds[i]:bounds[i + 1]], low_bits,
                                                        array[bounds[i]:bounds[i + 1]]), range(threads)))
        else:
            _sort_rows_numpy(values, low_bits, array)
        tie_order = order
    else:
        bits = floats.view(torch.int32).long()
        sign = bits >> 31
        keys = (~((bits ^ (sign & 0x7FFFFFFF)) - sign)) << 32 | low
        tie_order = torch.sort(keys, dim=1).values & (0xFFFF if size <= 1 << 16 else _LOW32)
    if size <= 1 << 16:
        return tie_order  # the column itself
    return tie_order if permutation is None else permutation.to(tie_order.device)[tie_order]


# exp(x) for x below this is a float32 subnormal or 0 (< 1.2e-38): far below the eps floor, and subnormals are
# slow on CPUs; clamping there changes no result (T_j moves by < N * 1.2e-38 against eps).
_EXP_FLOOR = -87.0


def _rows_loss_and_grad(scores, targets, low, permutation, eps, grad_out=None):
    """Sum over rows of the loss (float64) of one block of rows; ``grad_out`` [b, N] float32, when given, receives
    d(sum)/d scores.

    float32 throughout (the loss's row sums accumulated in float64): more accurate than autograd through
    ``logcumsumexp`` in float32, because the floor keeps every ``1 / (T_j + eps)`` below 1 / eps (the tests
    measure both against float64). In place where it can be: each [b, N] pass is memory-bound."""
    order = _descending_order(targets, low, permutation)
    weights = scores.float().gather(1, order)  # the scores in target order ...
    top, top_index = weights.max(dim=1, keepdim=True)  # ... shifted by the row max m (the floor depends on it)
    weights.sub_(top)
    loss = -weights.sum(dim=1).double().sum()  # - sum_j (s_j - m)
    weights.clamp_(min=_EXP_FLOOR).exp_()  # exp(s_j - m)
    tails = weights.flip(1).cumsum(1).flip(1).add_(eps)  # T_j + eps, T_j = sum_{k >= j} exp(s_k - m)
    loss += tails.log().sum(dim=1).double().sum()
    if grad_out is None:
        return loss
    inverse = tails.reciprocal_()
    grad_ranked = inverse.cumsum(1).mul_(weights).sub_(1.0)  # exp(s_i - m) * sum_{j <= i} 1 / (T_j + eps) - 1
    grad_ranked.scatter_add_(1, top_index, eps * inverse.sum(dim=1, keepdim=True))  # d/dm, routed to the max
    grad_out.scatter_(1, order, grad_ranked)
    return loss


class _ListMLE(torch.autograd.Function):
    """``list_mle`` with its gradient formed in the forward pass (module docstring); keeps only that gradient."""

    @staticmethod
    def forward(ctx, scores, targets, permutation, eps):
        rows, size = scores.shape
        need_grad = ctx.needs_input_grad[0]
        low = _low_bits(_tie_positions(permutation, size, scores.device))  # each column's low key bits, once
        block = max(1, BLOCK_ELEMENTS // max(size, 1))
        total = torch.zeros((), dtype=torch.float64, device=scores.device)
        grad = torch.empty((rows, size), dtype=torch.float32, device=scores.device) if need_grad else None
        with torch.autocast(device_type=scores.device.type, enabled=False), torch.no_grad():
            # whole-matrix copies where a block of rows would be strided (e.g. a transposed similarity matrix)
            rows_scores, targets = scores.contiguous(), targets.contiguous()
            for start in range(0, rows, block):
                stop = min(rows, start + block)
                total += _rows_loss_and_grad(rows_scores[start:stop], targets[start:stop], low, permutation, eps,
                                             grad[start:stop] if need_grad else None)
        if need_grad:
            if not scores.is_contiguous() and scores.T.is_contiguous():  # e.g. the transpose of a similarity matrix:
                grad = grad.T.contiguous().T  # in its layout, so autograd adds it to the matrix's other gradients fast
            ctx.save_for_backward(grad)
            ctx.rows, ctx.dtype = rows, scores.dtype
        return (total / rows).float()

    @staticmethod
    def backward(ctx, grad_output):
        grad, = ctx.saved_tensors
        return (grad * (grad_output / ctx.rows)).to(ctx.dtype), None, None, None


def list_mle_autograd(scores: torch.Tensor, targets: torch.Tensor, permutation: Optional[torch.Tensor] = None,
             eps: float = DEFAULT_EPS) -> torch.Tensor:
    """``list_mle`` through autograd (``logcumsumexp``): the reference statement of the loss.

    Mean over rows of the ListMLE loss of ``scores`` [R, N] ranked by ``targets`` [R, N].

    ``targets`` only set the order and carry no gradient. ``permutation`` [N]: the tie-break order of the
    columns (ties in a row go in the order the columns appear in the permutation); None: ties keep column
    order. Computed in float32 (autocast off), so bf16/fp16 inputs give finite values and gradients.
    """
    _check_shapes(scores, targets)
    with torch.autocast(device_type=scores.device.type, enabled=False):
        scores = scores.float()
        targets = targets.detach().float()
        if permutation is None:
            order = targets.sort(dim=1, descending=True, stable=True).indices
        else:
            permutation = permutation.to(scores.device)
            order = permutation[targets[:, permutation].sort(dim=1, descending=True, stable=True).indices]
        ranked = scores.gather(1, order)
        shifted = ranked - ranked.max(dim=1, keepdim=True).values
        log_tail = torch.logcumsumexp(shifted.flip(1), dim=1).flip(1)
        log_tail = torch.logaddexp(log_tail, torch.full_like(log_tail, math.log(eps)))
        return (log_tail - shifted).sum(dim=1).mean()
