"""The text side of a rank batch: token ids plus targets, moved together by ``.to()``.

OpenCLIP's training loop does ``texts.to(device)`` and ``model(images, texts)``; passing this
container as ``texts`` lets targets reach the model (and from its output dict, the loss) without
changing that loop. Kept apart from ``data.py`` so the model does not import the data stack.
"""
from typing import NamedTuple

import torch


class RankTexts(NamedTuple):
    tokens: torch.Tensor  # [N, context_length] token ids
    targets: torch.Tensor  # [N] float ranking targets
    category_ids: torch.Tensor  # [N] index into the dataset's category names
    with_pairs: bool = True  # False when the loss needs no pair head (single-head): it is not run

    def to(self, *args, **kwargs):
        return RankTexts(*(t.to(*args, **kwargs) if isinstance(t, torch.Tensor) else t for t in self))
