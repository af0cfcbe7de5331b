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
"""
import math
from typing import Optional, Sequence

import torch

DEFAULT_EPS = 1e-10


def tie_permutation(size: int, seed: Sequence[int], device=None) -> torch.Tensor:
    """A permutation of ``range(size)`` that depends only on ``seed`` (a tuple of ints): every process
    that passes the same seed gets the same permutation, whatever its global RNG state."""
    generator = torch.Generator()
    generator.manual_seed(hash(tuple(int(s) for s in seed)) % (2 ** 63))
    return torch.randperm(size, generator=generator).to(device)


def list_mle(scores: torch.Tensor, targets: torch.Tensor, permutation: Optional[torch.Tensor] = None,
             eps: float = DEFAULT_EPS) -> torch.Tensor:
    """Mean over rows of the ListMLE loss of ``scores`` [R, N] ranked by ``targets`` [R, N].

    ``targets`` only set the order and carry no gradient. ``permutation`` [N]: the tie-break order of the
    columns (ties in a row go in the order the columns appear in the permutation); None: ties keep column
    order. Computed in float32 (autocast off), so bf16/fp16 inputs give finite values and gradients.
    """
    if scores.shape != targets.shape or scores.dim() != 2:
        raise ValueError(f"list_mle needs scores and targets of the same shape [rows, items], got "
                         f"{tuple(scores.shape)} and {tuple(targets.shape)}.")
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
