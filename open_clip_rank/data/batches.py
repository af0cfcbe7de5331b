"""The text side of a rank batch as it travels through OpenCLIP's training loop."""
from typing import NamedTuple

import torch


class RankTexts(NamedTuple):
    """The text side of a rank batch: token ids plus targets, moved together by ``.to()``.

    OpenCLIP's training loop does ``texts.to(device)`` and ``model(images, texts)``; passing this
    container as ``texts`` lets targets reach the model (and from its output dict, the loss) without
    changing that loop.
    """
    tokens: torch.Tensor  # [N, context_length] token ids
    targets: torch.Tensor  # [N] float ranking targets
    category_ids: torch.Tensor  # [N] index into the dataset's category names
    with_pairs: bool = True  # False when the loss needs no pair head (single-head): it is not run
    # --rank-global-pairs: the model returns per-image pair summaries (and the pair head) instead of the
    # local [N, N] pair logits, and the loss forms pairs over the batch gathered from all processes
    global_pairs: bool = False

    def to(self, *args, **kwargs):
        return RankTexts(*(t.to(*args, **kwargs) if isinstance(t, torch.Tensor) else t for t in self))
