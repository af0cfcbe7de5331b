"""The OrdinalCLIP family: OpenCLIP models whose text side is a set of learned rank prompts.

Any OpenCLIP config with an ``ordinal_cfg`` block (``models/ordinal_prompts.py``) builds
``OrdinalCLIP`` (from ``CLIP``) or ``OrdinalCustomTextCLIP`` (from ``CustomTextCLIP`` with an OpenCLIP
text tower). Per forward the R rank prompts pass the text tower once, giving R prototypes p_r; an
image's logits are s * cos(f(x), p_r) with CLIP's logit scale s (frozen, as the official runner gives
it learning rate 0), its predicted rank is the expectation sum_r r softmax(logits)_r (and the argmax).
After training the prototypes can be frozen (``freeze_prototypes``): then only the image tower runs.
``ordinal_cfg.prompt_learner: "baseline"`` builds the official CNN baseline instead: R learned class prototypes
(``ClassPrototypes``), no prompts, the text tower frozen and unused, logits 100 * cos(f(x), p_r).
``--ordinal-freeze-context`` / ``--ordinal-freeze-ranks`` (``ordinal_options.py``) freeze one part of the prompt
learner when the model is built in a training run (the official tune-rank / tune-ctx ablations).
"""
import logging
from typing import Optional

import torch
import torch.nn.functional as F

from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import lock_text_tower

from ..data.ordinal_dataset import OrdinalTargets  # noqa: F401  (the batch type, re-exported for the family)
from ..integration.run_state import run_flag
from .base import RankModel, RankOutput
from .ordinal_prompts import BASELINE_LOGIT_SCALE, ClassPrototypes, OrdinalCfg, RankPrompts
from .towers import encode_text_embeddings, text_token_embedding

_logger = logging.getLogger(__name__)


class OrdinalOutput(RankOutput):
    """Outputs of an ordinal model; ``logits`` (the official name) reads ``ordinal_logits``."""
    ALIASES = {'logits': lambda out: out['ordinal_logits']}


def _tokenizer_for(text_cfg):
    """The BPE tokenizer the prompts are written in (OpenCLIP's ``SimpleTokenizer``, as CLIP's)."""
    from open_clip.tokenizer import SimpleTokenizer
    cfg = text_cfg if isinstance(text_cfg, dict) else vars(text_cfg)
    if cfg.get('hf_tokenizer_name') or cfg.get('hf_model_name'):
        raise ValueError(
            "ordinal_cfg needs a CLIP BPE text tower: this config's text_cfg uses a Hugging Face tokenizer/model "
            f"({cfg.get('hf_tokenizer_name') or cfg.get('hf_model_name')}); pick a config without hf_* text keys.")
    return SimpleTokenizer()


def expected_ranks(probs: torch.Tensor) -> torch.Tensor:
    """sum_r r * p_r over rank indices 0..R-1."""
    values = torch.arange(probs.shape[-1], device=probs.device, dtype=probs.dtype)
    return probs @ values


class OrdinalMixin(RankModel):
    family_name = 'ordinal'
    fresh_state_prefixes = ('prompt_learner.',)
    supports_pairwise = False
    needs_prompt = False  # the prompts are learned: ranking needs no instruction

    def _init_ordinal(self, embed_dim: int, ordinal_cfg, text_cfg):
        self.prototype_dim = int(embed_dim)
        self.ordinal_cfg = OrdinalCfg.from_dict(ordinal_cfg)
        self.num_ranks = self.ordinal_cfg.num_ranks
        self.logit_scale.requires_grad_(False)  # frozen, as the official runner (learning rate 0)
        self.register_buffer('frozen_prototypes', None, persistent=False)
        if self.ordinal_cfg.is_baseline:
            self.prompt_learner = ClassPrototypes(self.num_ranks, self.prototype_dim)
            for name, parameter in self.named_parameters():  # the text tower is not used: never trained
                if not name.startswith(('visual.', 'prompt_learner.')):
                    parameter.requires_grad_(False)
        else:
            self._init_prompts(text_cfg)
        self.freeze_prompt_parts(context=run_flag('ordinal_freeze_context'), ranks=run_flag('ordinal_freeze_ranks'))

    def _init_prompts(self, text_cfg):
        embedding = text_token_embedding(self)
        tokenizer = _tokenizer_for(text_cfg)
        if embedding.num_embeddings < len(tokenizer.encoder):
            raise ValueError(f"text_cfg.vocab_size={embedding.num_embeddings} is smaller than the CLIP tokenizer's "
                             f"{len(tokenizer.encoder)} tokens that the rank prompts are written in.")
        self.prompt_learner = RankPrompts(self.ordinal_cfg, embedding, self.context_length, tokenizer)

    def freeze_prompt_parts(self, context: bool = False, ranks: bool = False):
        """Stop training the context embeddings and/or the rank embeddings (the baseline's class prototypes), as
        the official optimiser configs tune-rank.yaml / tune-ctx.yaml (learning rate 0 for the other part)."""
        parts = []
        if context:
            if self.ordinal_cfg.is_baseline:
                raise ValueError("--ordinal-freeze-context: the baseline (prompt_learner 'baseline') has no context "
                                 "embeddings.")
            self.prompt_learner.context_embeds.requires_grad_(False)
            parts.append('context embeddings')
        if ranks:
            learner = self.prompt_learner
            (learner.prototypes if self.ordinal_cfg.is_baseline else learner.rank_embeds).requires_grad_(False)
            parts.append('class prototypes' if self.ordinal_cfg.is_baseline else 'rank embeddings')
        if parts:
            _logger.info(f"OrdinalCLIP: {' and '.join(parts)} frozen (not trained).")

    def ordinal_logit_scale(self) -> torch.Tensor:
        """CLIP's (frozen) logit scale, exponentiated; the baseline's fixed 100, as the official ``Baseline``."""
        if self.ordinal_cfg.is_baseline:
            return torch.tensor(BASELINE_LOGIT_SCALE, device=self.logit_scale.device, dtype=self.logit_scale.dtype)
        return self.logit_scale.exp()

    def reset_fresh_parameters(self):
        """After base CLIP weights load: initialise word-initialised prompts from the loaded embeddings."""
        self.prompt_learner.reset_parameters(text_token_embedding(self))

    # --- prototypes -------------------------------------------------------------------------------

    def compute_prototypes(self) -> torch.Tensor:
        """[R, D] normalised text features of the R rank prompts: one text-tower pass for all ranks (the
        baseline: its normalised class prototypes)."""
        learner = self.prompt_learner
        if self.ordinal_cfg.is_baseline:
            return F.normalize(learner.prototypes, dim=-1)
        features = encode_text_embeddings(self, learner.pseudo_tokens, learner.fill)
        return F.normalize(features, dim=-1)

    def prototypes(self) -> torch.Tensor:
        return self.frozen_prototypes if self.frozen_prototypes is not None else self.compute_prototypes()

    @torch.no_grad()
    def freeze_prototypes(self, prototypes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Fix the prototypes (computed now, or given, e.g. from an exported file): inference then runs the
        image tower only."""
        if prototypes is None:
            prototypes = self.compute_prototypes()
        if tuple(prototypes.shape) != (self.num_ranks, self.prototype_dim):
            raise ValueError(f"prototypes of shape {tuple(prototypes.shape)} do not fit this model "
                             f"({self.num_ranks} ranks x {self.prototype_dim} features).")
        device = self.logit_scale.device
        self.frozen_prototypes = prototypes.detach().to(device=device, dtype=torch.float32)  # as exported: normalised
        return self.frozen_prototypes

    # --- OpenCLIP's forward contract --------------------------------------------------------------

    def forward(self, image: Optional[torch.Tensor] = None, text=None):
        """``model(image)`` / ``model(image, OrdinalTargets)``: the ordinal outputs (text is not needed: the
        prompts are learned); ``model(text=tokens)`` alone: OpenCLIP's text features."""
        if image is None:
            return super().forward(None, text)
        return self.rank_forward(image, text)

    def rank_forward(self, image: torch.Tensor, text=None) -> OrdinalOutput:
        image_features = self.encode_image(image, normalize=True)
        prototypes = self.prototypes()
        logit_scale = self.ordinal_logit_scale()
        logits = logit_scale * image_features @ prototypes.to(image_features.dtype).T
        probs = logits.float().softmax(dim=-1)
        out = OrdinalOutput(
            ordinal_logits=logits,
            expected_rank=expected_ranks(probs),
            predicted_rank=probs.argmax(dim=-1),
            image_features=image_features,
            text_features=prototypes,
            logit_scale=logit_scale,
        )
        if isinstance(text, OrdinalTargets):
            out['targets'] = text.labels
        return out

    # --- the rank-model protocol ------------------------------------------------------------------

    def encode_image_tokens(self, image: torch.Tensor) -> torch.Tensor:
        """[N, D] normalised image features: all an ordinal model needs per image."""
        return self.encode_image(image, normalize=True)

    def encode_prompts(self, text: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The [R, D] rank prototypes (``text`` is ignored: the prompts are learned)."""
        return self.prototypes()

    def score_tokens(self, image_tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        return self.rank_predictions(image_tokens, prompts)['score']

    def rank_predictions(self, image_tokens: torch.Tensor, prompts: torch.Tensor) -> dict:
        logits = self.ordinal_logit_scale() * image_tokens @ prompts.to(image_tokens.dtype).T
        probs = logits.float().softmax(dim=-1)
        expected = expected_ranks(probs)
        return {'score': expected, 'expected_rank': expected, 'predicted_rank': probs.argmax(dim=-1),
                'probs': probs}

    @torch.no_grad()
    def rank_prototypes(self) -> torch.Tensor:
        return self.prototypes()


class OrdinalCLIP(OrdinalMixin, CLIP):
    """OpenCLIP ``CLIP`` + OrdinalCLIP rank prompts (prompt learner under ``prompt_learner.*``)."""

    def __init__(self, embed_dim, vision_cfg, text_cfg, ordinal_cfg=None, quick_gelu: bool = False,
                 cast_dtype: Optional[torch.dtype] = None, **kwargs):
        ordinal_cfg = OrdinalCfg.from_dict(ordinal_cfg)  # config errors before any tower is built
        super().__init__(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu, cast_dtype=cast_dtype, **kwargs)
        self._init_ordinal(embed_dim, ordinal_cfg, text_cfg)

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True):
        """``--lock-text`` locks the whole text tower, LayerNorms included (the paper's regime).

        OpenCLIP 3.3's ``CLIP.lock_text_tower`` asserts ``freeze_layer_norm``, which its CLI passes as False
        unless ``--lock-text-freeze-layer-norm`` is given; the prompt learner stays trainable.
        """
        lock_text_tower(self, unlocked_layers)


class OrdinalCustomTextCLIP(OrdinalMixin, CustomTextCLIP):
    """OpenCLIP ``CustomTextCLIP`` (separate ``text`` tower) + OrdinalCLIP rank prompts."""

    def __init__(self, embed_dim, vision_cfg, text_cfg, ordinal_cfg=None, quick_gelu: bool = False,
                 cast_dtype: Optional[torch.dtype] = None, **kwargs):
        ordinal_cfg = OrdinalCfg.from_dict(ordinal_cfg)
        if not ordinal_cfg.is_baseline:  # the baseline runs no text: any text tower will do
            _tokenizer_for(text_cfg)  # HF text towers: one clear error before building anything
        super().__init__(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu, cast_dtype=cast_dtype, **kwargs)
        self._init_ordinal(embed_dim, ordinal_cfg, text_cfg)
