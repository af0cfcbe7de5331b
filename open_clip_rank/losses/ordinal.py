"""OrdinalCLIP's loss: cross-entropy over rank logits + a batch-level KL term, as the official runner.

The KL term looks at each rank slot r across the batch: the model's distribution over images
softmax_n(logits[n, r]) should match the target softmax_n(10 * 1[y_n = r]), which is uniform over the
images labelled r (and ~0 elsewhere). Slots with no image of their label in the batch are dropped,
and the summed KL is divided by the number of slots present.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .micro_batches import mean_over_micro_batches

KL_TARGET_SHARPNESS = 10.0  # the official one-hot scale before the softmax over the batch


def ordinal_ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels)


def ordinal_kl_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sum over present rank slots r of KL(target_r || softmax_n(logits[:, r])) / #present slots."""
    num_ranks = logits.shape[-1]
    one_hot = F.one_hot(labels, num_ranks).T.to(logits.dtype)  # [R, N]
    present = one_hot.sum(dim=-1) > 0
    target = (one_hot[present] * KL_TARGET_SHARPNESS).softmax(dim=-1)
    log_pred = F.log_softmax(logits.T[present], dim=-1)
    return F.kl_div(log_pred, target, reduction='sum') / present.sum()


class OrdinalLoss(nn.Module):
    """``ce_weight`` * CE + ``kl_weight`` * KL on ``ordinal_logits`` [N, R] and integer ``targets`` [N].

    The KL term is a batch-level statistic: under ``--accum-freq`` each micro-batch of ``micro_batch_size``
    rows keeps its own, as the official runner's step batch (``micro_batches.py``).
    """

    def __init__(self, ce_weight: float = 1.0, kl_weight: float = 1.0, micro_batch_size: Optional[int] = None):
        super().__init__()
        self.ce_weight, self.kl_weight = ce_weight, kl_weight
        self.micro_batch_size = micro_batch_size

    def forward(self, ordinal_logits: torch.Tensor, targets: torch.Tensor, output_dict: bool = False, **_):
        logits, labels = ordinal_logits.float(), targets.long()
        losses = mean_over_micro_batches(self._batch_losses, self.micro_batch_size, logits, labels)
        return losses if output_dict else sum(losses.values())

    def _batch_losses(self, logits, labels):
        losses = {}
        if self.ce_weight:
            losses['ordinal_ce_loss'] = self.ce_weight * ordinal_ce_loss(logits, labels)
        if self.kl_weight:
            losses['ordinal_kl_loss'] = self.kl_weight * ordinal_kl_loss(logits, labels)
        return losses


# --- --loss-opt ordinal: builder, flags and their checks (registered in builtin.py) ----------------------

def build_ordinal_loss(args) -> OrdinalLoss:
    return OrdinalLoss(ce_weight=args.ordinal_ce_weight, kl_weight=args.ordinal_kl_weight,
                       micro_batch_size=args.batch_size)


def add_ordinal_loss_args(parser):
    group = parser.add_argument_group('open_clip_rank: OrdinalCLIP loss (ordinal)')
    group.add_argument('--ordinal-ce-weight', type=float, default=1.0, help='Weight of the ordinal cross-entropy.')
    group.add_argument('--ordinal-kl-weight', type=float, default=1.0,
                       help='Weight of the ordinal batch KL term (0 switches it off).')


def check_ordinal_loss_args(args):
    if args.csv_dataset_sample_type != 'ordinal':
        return
    if args.ordinal_ce_weight < 0 or args.ordinal_kl_weight < 0 or args.ordinal_ce_weight + args.ordinal_kl_weight == 0:
        raise ValueError("--ordinal-ce-weight and --ordinal-kl-weight must be >= 0, not both 0.")
