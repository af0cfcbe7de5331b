"""Pairwise ranking losses for adapter models (``--loss-opt dual-head | single-head``).

Defaults reproduce the official ``ClipAdapterLossV2`` (dual head) and ``ClipWithAdapterLoss``
(single head): 0.2 * log(1 + smoothL1(s, y)) + 1.0 * BCE over all N*N ordered pairs (label 1 when
y_i > y_j; ties and the diagonal count as 0) + 1.0 * BCE(s, y != 0) when ``bce`` is a component.
Returned as a dict of named parts, which OpenCLIP's ``train_one_epoch`` sums and logs by name.

Pairs across GPUs (``--rank-global-pairs``): the N = B * W images of one step (every process holds B rows of
the same category, see ``RankBatchSampler``) form one N x N pair matrix P. Its loss is
L = (1 / M) * sum_{i, j} m_ij * BCE(P_ij, y_i > y_j) with m_ij = 1 and M = N^2 by default (m_ij = [y_i != y_j],
M = sum m with ``ignore_ties``). Process r holds rows R_r and gathers the others' pair summaries, scores and
targets (tiny: per image o [H, Q, d], L [H, Q]). It reports L_r = (W / M) * sum_{i in R_r, j} m_ij BCE_ij,
so mean_r L_r = L, and back-propagates:

* gathered without gradient (default, local rows live as in OpenCLIP's ``ClipLoss``): L_r plus the column
  block C_r = (W / M) * sum_{i not in R_r, j in R_r} m_ij BCE_ij, with zero value and its gradient passed on
  only through the local summaries s (as <s, dC_r/ds> - its detached value; the pair head's own parameters
  get their share of those pairs on the process owning the rows). Every term with a local image then reaches
  it, so the gradient at a local summary is W * dL/ds, the pair head's parameters get W * (their share of
  rows R_r), and DDP's mean over the W processes of the parameter gradients is exactly dL/dtheta. Cost per process: B * N + (N - B) * B pair
  logits (about 2 B N) instead of B^2.
* ``--gather-with-grad``: L_r alone (B * N pair logits); the all-gather's backward sums every process's
  gradient into the local summaries, which again get W * dL/ds.

The bce part is a mean of per-image terms: it stays the local mean (DDP's mean over processes is the global
mean). The regression part log(1 + m), m the mean smooth-L1 over all N images, is not: every process reports
the global value and back-propagates local_mean / (1 + m) (m gathered without gradient).
"""
from typing import Dict, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .micro_batches import mean_over_micro_batches

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


def _through_inputs_only(value: torch.Tensor, inputs) -> torch.Tensor:
    """A zero-valued term whose gradient is d value / d inputs, passed on only through ``inputs``: the pair
    head's own parameters get none from it (the process owning those rows counts their pairs already)."""
    live = [t for t in inputs if t.requires_grad]
    if not live or not value.requires_grad:
        return value.detach() * 0.0
    grads = torch.autograd.grad(value, live, retain_graph=True, allow_unused=True)
    term = sum((t.float() * g.float()).sum() for t, g in zip(live, grads) if g is not None)
    return term - term.detach() if torch.is_tensor(term) else value.detach() * 0.0


def _score_differences(scores_i, scores_j):
    """Single-head pair logits [I, J] = s_i - s_j, in the blockwise form of ``pair_logits_between``."""
    (s_i,), (s_j,) = scores_i, scores_j
    return s_i.unsqueeze(1) - s_j.unsqueeze(0)


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
            global_pairs: bool = False,
            gather_with_grad: bool = False,
            rank: int = 0,
            world_size: int = 1,
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
        self.global_pairs = global_pairs  # pairs over the batch of all processes (module docstring)
        self.gather_with_grad = gather_with_grad
        self.rank, self.world_size = rank, world_size

    def forward(self, rank_scores, targets=None, pair_logits=None, output_dict: bool = False,
                pair_summaries=None, pair_logits_between=None, **_model_outputs):
        """Loss of one rank batch; pairs never cross micro-batches.

        With ``--accum-freq`` > 1 OpenCLIP concatenates the outputs of all micro-batches (pair logits
        [k*B, B]); the loss is then the mean of the per-micro-batch losses, so the accumulated gradient
        equals the gradient of that mean.
        """
        if targets is None:
            raise ValueError("rank losses need targets: train with --dataset-type csv --csv-dataset-sample-type rank.")
        scores = rank_scores.float()
        targets = targets.to(scores.device, torch.float32).view(-1)
        if self.global_pairs:
            losses = self._global_losses(scores, targets, pair_summaries, pair_logits_between)
            return losses if output_dict else sum(losses.values())
        size = self.micro_batch_size or len(scores)
        if pair_logits is not None and pair_logits.shape[0] != pair_logits.shape[1]:
            size = pair_logits.shape[1]  # rows are stacked [B, B] blocks, one per micro-batch
        losses = mean_over_micro_batches(self._batch_losses, size, scores, targets, pair_logits)
        return losses if output_dict else sum(losses.values())

    def _gather(self, tensors, with_grad: bool):
        """All processes' rows of each tensor, concatenated in rank order; the local rows stay live."""
        if self.world_size <= 1:
            return list(tensors)
        import torch.distributed as dist
        if with_grad:
            from torch.distributed.nn.functional import all_gather  # backward sums every process's gradient
            return [torch.cat(all_gather(t.contiguous()), dim=0) for t in tensors]
        gathered = []
        for t in tensors:
            parts = [torch.empty_like(t) for _ in range(self.world_size)]
            dist.all_gather(parts, t.detach().contiguous())
            parts[self.rank] = t
            gathered.append(torch.cat(parts, dim=0))
        return gathered

    def _global_losses(self, scores, targets, pair_summaries, pair_logits_between):
        """Losses of this process's rows of the global batch (module docstring: values and gradients)."""
        losses = {}
        if 'regression' in self.components:
            losses['regression_loss'] = self.weights['regression'] * self._global_regression(scores, targets)
        if 'rank' in self.components:
            if self.head == 'dual':
                if pair_summaries is None or pair_logits_between is None:
                    raise ValueError("--rank-global-pairs with the dual-head loss needs the model's pair_summaries "
                                     "(an adapter model fed RankTexts with global_pairs=True).")
                local = tuple(pair_summaries)
                pairs = pair_logits_between
            else:
                local = (scores,)
                pairs = _score_differences
            everyone = self._gather(local, self.gather_with_grad)
            all_targets = self._gather((targets,), False)[0]
            n_local, start = len(targets), self.rank * len(targets)
            rows = slice(start, start + n_local)
            weight, mask = self._pair_weights(all_targets)
            # rows R_r x all columns: the value of this process's share
            logits = pairs(local, everyone).float()
            labels = pairwise_labels(all_targets)[rows]
            bce = F.binary_cross_entropy_with_logits(logits, labels, reduction='none')
            rank_loss = (bce if mask is None else bce * mask[rows]).sum() * weight
            if self.world_size > 1 and not self.gather_with_grad:
                # other rows x local columns: gradient only (value 0), the terms the gathered copies cannot carry
                others = torch.ones(len(all_targets), dtype=torch.bool, device=all_targets.device)
                others[rows] = False
                other = tuple(t[others] for t in everyone)
                logits = pairs(other, local).float()
                labels = pairwise_labels(all_targets)[others][:, rows]
                bce = F.binary_cross_entropy_with_logits(logits, labels, reduction='none')
                column = (bce if mask is None else bce * mask[others][:, rows]).sum() * weight
                rank_loss = rank_loss + _through_inputs_only(column, local)
            losses['rank_loss'] = self.weights['rank'] * rank_loss
        if 'bce' in self.components:
            losses['bce_loss'] = self.weights['bce'] * nonzero_bce_loss(scores, targets)
        return losses

    def _global_regression(self, scores, targets):
        """log(1 + m) with m the global mean smooth-L1 (not a mean of per-image terms): every process reports
        log(1 + m); its gradient is W * dL/ds at the local scores, i.e. local_mean(smoothL1) / (1 + m)."""
        per_image = F.smooth_l1_loss(scores, targets, reduction='none')
        if self.world_size <= 1:
            return regression_loss(scores, targets)
        local = per_image.mean()
        global_mean = self._gather((per_image.detach(),), False)[0].mean()
        return torch.log1p(global_mean) + (local - local.detach()) / (1 + global_mean)

    def _pair_weights(self, all_targets):
        """(W / M, mask or None): the scale of a summed BCE term and which pairs count (``pair_rank_loss``)."""
        n = len(all_targets)
        if not self.ignore_ties:
            return self.world_size / (n * n), None
        mask = (all_targets.unsqueeze(1) != all_targets.unsqueeze(0)).float()
        count = mask.sum()
        return (self.world_size / count if count > 0 else 0.0), mask

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


# --- --loss-opt dual-head | single-head: builders, flags and their checks (registered in builtin.py) ------------

def _build(head: str, args) -> RankingLoss:
    weights = {'rank': args.rank_loss_weight, 'regression': args.regression_loss_weight,
               'bce': args.bce_loss_weight}
    return RankingLoss(head=head, components=args.loss_components, weights=weights,
                       ignore_ties=args.pair_loss_ignore_ties, micro_batch_size=args.batch_size,
                       global_pairs=getattr(args, 'rank_global_pairs', False),
                       gather_with_grad=getattr(args, 'gather_with_grad', False),
                       rank=getattr(args, 'rank', 0), world_size=getattr(args, 'world_size', 1))


def build_dual_head_loss(args) -> RankingLoss:
    return _build('dual', args)


def build_single_head_loss(args) -> RankingLoss:
    return _build('single', args)


def add_ranking_loss_args(parser):
    group = parser.add_argument_group('open_clip_rank: pairwise ranking losses (dual-head, single-head)')
    group.add_argument(
        '--loss-components', nargs='+', choices=LOSS_COMPONENTS, default=list(DEFAULT_COMPONENTS),
        help="Parts of the ranking loss: pairwise 'rank' BCE, 'regression' log(1 + smoothL1), 'bce' on target != 0.")
    group.add_argument('--rank-loss-weight', type=float, default=1.0, help='Weight of the pairwise rank loss.')
    group.add_argument('--regression-loss-weight', type=float, default=0.2, help='Weight of the regression loss.')
    group.add_argument('--bce-loss-weight', type=float, default=1.0, help='Weight of the target != 0 BCE loss.')
    group.add_argument(
        '--pair-loss-ignore-ties', action='store_true', default=False,
        help='Leave pairs with equal targets (and the diagonal) out of the pair loss. Default: as the original, '
             'they count with label 0.')
    group.add_argument(
        '--rank-global-pairs', action='store_true', default=False,
        help='Pair losses (dual-head, single-head) form pairs over the global batch of all processes: every '
             'process gets the same category at each step (its --batch-size slice of one batch of batch-size x '
             'world-size rows) and the pair summaries, scores and targets are gathered, so the pair loss sees '
             'N = B x W images (gradients exact; --gather-with-grad gathers with gradient). Default: pairs '
             'within each process\'s batch, as the original.')


def check_ranking_loss_args(args):
    """``--rank-global-pairs`` works with the pair losses on CSV rank data, one step per batch, torch.distributed."""
    if not getattr(args, 'rank_global_pairs', False):
        return
    from ..data.shards import uses_shards
    from ..registry import resolved_loss
    loss = resolved_loss(args)
    if loss is None or not loss.forms_pairs or args.csv_dataset_sample_type != loss.sample_type:
        raise ValueError(f"--rank-global-pairs forms pairs of the dual-head / single-head loss over all processes: "
                         f"it needs --csv-dataset-sample-type rank and one of those losses (got "
                         f"--csv-dataset-sample-type {args.csv_dataset_sample_type}, loss "
                         f"{loss.name if loss else None}).")
    if getattr(args, 'accum_freq', 1) > 1:
        raise ValueError("--rank-global-pairs does not support --accum-freq > 1 (pairs would have to span the "
                         "accumulated micro-batches of every process); use --accum-freq 1.")
    if getattr(args, 'horovod', False):
        raise ValueError("--rank-global-pairs gathers with torch.distributed; it does not support --horovod.")
    if uses_shards(args):
        raise ValueError("--rank-global-pairs needs the same category on every process at each step, which streamed "
                         "shards do not give; use --dataset-type csv rank data.")
