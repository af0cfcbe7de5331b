"""The rank-model protocol: what inference, evaluation and the CLI may call on any family's model.

Every family's model classes subclass OpenCLIP's ``CLIP`` / ``CustomTextCLIP`` and mix in ``RankModel``.
Callers outside a family's own module use only the methods below, never the family's submodules:

* ``encode_image_tokens(image)`` -> per-image state (tokens), the expensive tower pass, once per image;
* ``encode_prompts(text)`` -> per-prompt state, once per instruction;
* ``score_tokens(image_tokens, prompts)`` -> [N] scores (prompts: one per image, or one for all);
* ``rank_scores(image, text)`` -> [N], the three above in one call (no pair head);
* ``rank_predictions(image_tokens, prompts)`` -> dict with ``score`` [N] plus what the family predicts
  besides (ordinal: ``expected_rank``, ``predicted_rank``, ``probs``);
* ``needs_prompt``: False where the text side is learned (ordinal): ``encode_prompts(None)`` then works;
* ``rank_prototypes()`` -> [R, D] learned rank prototypes, or None for families without them;
* ``supports_pairwise`` and, where True, ``pair_summaries`` / ``pair_logits_between`` (blockwise pair head).

OpenCLIP's own forward contract holds too: ``model(image=x)`` or ``model(text=t)`` alone returns
what a plain CLIP returns (pooled, normalised ``image_features`` / ``text_features``), so zero-shot
evaluation works on a rank model's towers; ``model(image, text)`` returns the family's rank outputs.
"""
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..data.batches import RankTexts  # noqa: F401  (the rank batch type, part of the protocol)
from ..integration import compat
from .towers import pooled_image_features


def unwrap(model):
    """The model inside a DDP / DataParallel wrapper."""
    return getattr(model, 'module', model)


class RankOutput(dict):
    """A model's output dict, plus read-only aliases computed from its entries on access.

    Aliases (``ALIASES``: name -> function of the output) are not keys: OpenCLIP's loop and losses,
    which iterate over the entries, never see them, and nothing is stored twice.
    """
    ALIASES: Dict[str, Callable[['RankOutput'], torch.Tensor]] = {}

    def __missing__(self, key):
        if key in self.ALIASES:
            return self.ALIASES[key](self)
        raise KeyError(key)


compat.register_output_type(RankOutput)


class RankModel:
    """Mixin for a family's model classes (placed before ``CLIP`` / ``CustomTextCLIP`` in the bases)."""

    family_name: str = ''
    # state-dict prefixes a base CLIP checkpoint cannot have: they start fresh when one is loaded
    fresh_state_prefixes: Tuple[str, ...] = ()
    supports_pairwise: bool = False
    needs_prompt: bool = True
    num_ranks: Optional[int] = None  # a fixed set of ranks (ordinal families) or None (scores from prompts)

    # --- OpenCLIP's forward contract ----------------------------------------------------------------

    def forward(self, image: Optional[torch.Tensor] = None, text=None, **rank_kwargs):
        if image is None or text is None:  # one tower alone: exactly what a plain CLIP returns
            if rank_kwargs:
                raise TypeError(f"{sorted(rank_kwargs)} need both image and text.")
            return super().forward(image, text)
        return self.rank_forward(image, text, **rank_kwargs)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """OpenCLIP's pooled image embedding [N, E] (the rank towers are built to emit tokens)."""
        features = pooled_image_features(self.visual, image)
        return F.normalize(features, dim=-1) if normalize else features

    def rank_forward(self, image: torch.Tensor, text, **kwargs) -> RankOutput:
        raise NotImplementedError

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Full checkpoints must match exactly; base CLIP weights load the towers, the rest starts fresh
        (see ``models/checkpoint.py``). OpenCLIP's ``load_checkpoint`` ends here too."""
        from .checkpoint import load_rank_state_dict
        return load_rank_state_dict(self, state_dict, strict=strict, assign=assign)

    # --- the rank-model protocol -------------------------------------------------------------------

    def encode_image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode_prompts(self, text: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def score_tokens(self, image_tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def rank_predictions(self, image_tokens: torch.Tensor, prompts: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``{'score': [N]}`` plus family-specific per-image predictions."""
        return {'score': self.score_tokens(image_tokens, prompts)}

    def rank_prototypes(self) -> Optional[torch.Tensor]:
        return None

    def freeze_prototypes(self, prototypes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fix the rank prototypes (given, or the current ones), so inference runs the image tower only."""
        raise ValueError(f"{self.family_name} models do not use rank prototypes.")

    def reset_fresh_parameters(self) -> None:
        """Called after base CLIP weights load (the family's own parts start fresh; they may depend on them)."""

    @torch.no_grad()
    def rank_scores(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Scores only ([N]): the cheap inference path."""
        return self.score_tokens(self.encode_image_tokens(image), self.encode_prompts(text))

    def pair_summaries(self, image_tokens: torch.Tensor, prompts: torch.Tensor):
        raise NotImplementedError(f"{self.family_name} models have no pair head (supports_pairwise is False).")

    def pair_logits_between(self, summaries_i, summaries_j) -> torch.Tensor:
        raise NotImplementedError(f"{self.family_name} models have no pair head (supports_pairwise is False).")
