"""Pairwise ranking losses for adapter models (``--loss-opt dual-head | single-head``).

Defaults reproduce the official ``ClipAdapterLossV2`` (dual head) and ``ClipWithAdapterLoss``
(single head): 0.2 * log(1 + smoothL1(s, y)) + 1.0 * BCE over all N*N ordered pairs (label 1 when
y_i > y_j; ties and the diagonal count as 0) + 1.0 * BCE(s, y != 0) when ``bce`` is a component.
Returned as a dict of named parts, which OpenCLIP's ``train_one_epoch`` sums and logs by name.
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

LOSS_COMPONENTS = ('regression', 'rank', 'bce')
DEFAULT_COMPONENTS = ('rank',)  # the original CLI's --loss-components default
DEFAULT_WEIGHTS = {'regression': 0.2, 'rank': 1.0, 'bce': 1.0}


def pairwise_labels(targets: torch.Tensor) -> torch.Tensor:
    """[N, N] with 1 where target i > target j (image i should rank above image j), else 0."""
    return (targets.unsqueeze(1) > targets.unsqueeze(0)).float()


def pair_rank_loss(pair_logits: torch.Tensor, targets: torch.Tensor, ignore_ties: bool = False) -> torch.Tensor:
    """BCE of pair logits [N, N] against the order of ``targets``.

    Default (as the original): all N*N ordered pairs, ties and the diagonal labelled 0.
    ``ignore_ties``: only pairs with different targets count (each unordered pair twice, once per order).
    """
    labels = pairwise_labels(targets).to(pair_logits.dtype)
    if not ignore_ties:
        return F.binary_cross_entropy_with_logits(pair_logits, labels)
    mask = targets.unsqueeze(1) != targets.unsqueeze(0)
    if not mask.any():
        return pair_logits.sum() * 0.0  # keeps the graph; nothing to order in this batch
    return F.binary_cross_entropy_with_logits(pair_logits[mask], labels[mask])


def regression_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.log1p(F.smooth_l1_loss(scores, targets))


def nonzero_bce_loss(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Is the target non-zero (e.g. any object present)? The original's ``bce`` component."""
    return F.binary_cross_entropy_with_logits(scores, (targets != 0).to(scores.dtype))


class RankingLoss(nn.Module):
    """Weighted sum of ranking losses on a rank-adapter model's outputs.

    ``head='dual'`` orders pairs with the pair head's ``pair_logits``; ``head='single'`` uses
    score differences s_i - s_j instead (no pair head needed).
    """

    def __init__(
            self,
            head: str = 'dual',
            components: Sequence[str] = DEFAULT_COMPONENTS,
            weights: Optional[Dict[str, float]] = None,
            ignore_ties: bool = False,
            micro_batch_size: Optional[int] = None,
    ):
        super().__init__()
        if head not in ('dual', 'single'):
            raise ValueError(f"head must be 'dual' or 'single', got {head!r}.")
        unknown = [c for c in components if c not in LOSS_COMPONENTS]
        if unknown or not components:
            raise ValueError(f"loss components {list(components)} invalid; choose from {list(LOSS_COMPONENTS)}.")
        self.head = head
        self.components = tuple(dict.fromkeys(components))
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.ignore_ties = ignore_ties
        self.micro_batch_size = micro_batch_size

    def forward(self, rank_scores, targets=None, pair_logits=None, output_dict: bool = False, **_model_outputs):
        """Loss of one rank batch; pairs never cross micro-batches.

        With ``--accum-freq`` > 1 OpenCLIP concatenates the outputs of all micro-batches (pair logits
        [k*B, B]); the loss is then the mean of the per-micro-batch losses, so the accumulated gradient
        equals the gradient of that mean.
        """
        if targets is None:
            raise ValueError("rank losses need targets: train with --dataset-type csv --csv-dataset-sample-type rank.")
        scores = rank_scores.float()
        targets = targets.to(scores.device, torch.float32).view(-1)
        size = self.micro_batch_size or len(scores)
        if pair_logits is not None and pair_logits.shape[0] != pair_logits.shape[1]:
            size = pair_logits.shape[1]  # rows are stacked [B, B] blocks, one per micro-batch
        chunks = [slice(start, start + size) for start in range(0, len(scores), size)]
        parts = [self._batch_losses(scores[c], targets[c], None if pair_logits is None else pair_logits[c])
                 for c in chunks]
        losses = {name: sum(p[name] for p in parts) / len(parts) for name in parts[0]}
        return losses if output_dict else sum(losses.values())

    def _batch_losses(self, scores, targets, pair_logits):
        losses = {}
        if 'regression' in self.components:
            losses['regression_loss'] = self.weights['regression'] * regression_loss(scores, targets)
        if 'rank' in self.components:
            if self.head == 'dual':
                if pair_logits is None:
                    raise ValueError("dual-head loss needs the model's pair_logits; use --loss-opt single-head "
                                     "or a model with the pair head.")
                logits = pair_logits.float()
            else:
                logits = scores.unsqueeze(1) - scores.unsqueeze(0)
            losses['rank_loss'] = self.weights['rank'] * pair_rank_loss(logits, targets, self.ignore_ties)
        if 'bce' in self.components:
            losses['bce_loss'] = self.weights['bce'] * nonzero_bce_loss(scores, targets)
        return losses
