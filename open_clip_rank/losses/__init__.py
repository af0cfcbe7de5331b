"""The plugin's losses: one class per loss, all called as OpenCLIP calls its losses (``loss(**model_out,
output_dict=True)``), and the factory OpenCLIP's ``create_loss`` hands over to.

The ``--loss-opt`` vocabulary is the registry's (``registry.LOSSES``, filled in ``builtin.py``): each loss module
holds its class, its builder from the training flags, its flags and their checks (import a loss class from its
module, e.g. ``open_clip_rank.losses.ranking.RankingLoss``). ``--loss-opt`` not given means
the model family's default loss for rank models and OpenCLIP's own loss otherwise; ``create_loss`` returns None
to hand loss creation back to OpenCLIP.

A loss with a ``start_epoch(epoch, args, tb_writer=None, step=0)`` method is told OpenCLIP's (0-based)
epoch before each ``train_one_epoch`` (``integration/hook.py``); RankCLIP's rank-loss ramp uses it.
"""


def create_loss(args):
    """The plugin's loss for these training args; None hands loss creation back to OpenCLIP."""
    from ..registry import resolved_loss
    loss = resolved_loss(args)
    return loss.build(args) if loss is not None else None
