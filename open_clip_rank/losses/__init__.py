"""The plugin's losses: one class per loss, all called as OpenCLIP calls its losses (``loss(**model_out,
output_dict=True)``), and one factory from the training flags.

``LOSSES`` is the whole ``--loss-opt`` vocabulary: name -> builder(args). ``--loss-opt`` not given
means the model family's default loss (``registry.py``) for rank models and OpenCLIP's own loss
otherwise; ``create_loss`` returns None to hand loss creation back to OpenCLIP.

A loss with a ``start_epoch(epoch, args, tb_writer=None, step=0)`` method is told OpenCLIP's (0-based)
epoch before each ``train_one_epoch`` (``hook.py``); RankCLIP's rank-loss ramp uses it.
"""
from typing import Callable, Dict

from .ordinal import OrdinalLoss
from .rankclip import RankCLIPLoss, build_rankclip_loss
from .ranking import DEFAULT_COMPONENTS, DEFAULT_WEIGHTS, LOSS_COMPONENTS, RankingLoss


def _pairwise_ranking_loss(head: str) -> Callable:
    def build(args):
        weights = {'rank': args.rank_loss_weight, 'regression': args.regression_loss_weight,
                   'bce': args.bce_loss_weight}
        return RankingLoss(head=head, components=args.loss_components, weights=weights,
                           ignore_ties=args.pair_loss_ignore_ties, micro_batch_size=args.batch_size,
                           global_pairs=getattr(args, 'rank_global_pairs', False),
                           gather_with_grad=getattr(args, 'gather_with_grad', False),
                           rank=getattr(args, 'rank', 0), world_size=getattr(args, 'world_size', 1))
    return build


def _ordinal_loss(args):
    return OrdinalLoss(ce_weight=args.ordinal_ce_weight, kl_weight=args.ordinal_kl_weight,
                       micro_batch_size=args.batch_size)


LOSSES: Dict[str, Callable] = {
    'dual-head': _pairwise_ranking_loss('dual'),  # pairs ordered by the adapter's pair head
    'single-head': _pairwise_ranking_loss('single'),  # pairs ordered by score differences
    'ordinal': _ordinal_loss,  # OrdinalCLIP: CE + batch KL over rank logits
    'rankclip': build_rankclip_loss,  # RankCLIP pretraining of plain CLIP models (losses/rankclip.py)
}
# Losses that train on targets, and the --csv-dataset-sample-type whose data carries them.
LOSS_SAMPLE_TYPES = {'dual-head': 'rank', 'single-head': 'rank', 'ordinal': 'ordinal'}
TARGET_LOSSES = tuple(LOSS_SAMPLE_TYPES)
# Losses that need the pair head's logits in each training batch.
PAIR_HEAD_LOSSES = ('dual-head',)


def resolved_loss_name(args):
    """``--loss-opt``, or the model family's default for rank models; None for plain OpenCLIP training."""
    from ..registry import family_for_model_name
    name = getattr(args, 'loss_opt', None)
    if name is None:
        family = family_for_model_name(getattr(args, 'model', None))
        name = family.default_loss if family is not None else None
    return name


def create_loss(args):
    """The plugin's loss for these training args; None hands loss creation back to OpenCLIP."""
    name = resolved_loss_name(args)
    return LOSSES[name](args) if name in LOSSES else None
