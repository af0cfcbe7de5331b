"""OrdinalCLIP's learned rank prompts: the ``ordinal_cfg`` block and the prompt learners.

Each rank r gets one sentence of token embeddings, ``<sot> ctx_1..ctx_C rank_r.1..rank_r.T . <eot>``
(rank tokens at the front, middle or tail), that the CLIP text tower turns into the rank's prototype.
The context tokens are shared by all ranks (or one set per rank); the rank tokens are

* ``rank`` learner (OrdinalCLIP): K learned base-rank embeddings B [K, T, W], and rank r's embedding is
  sum_k w[r, k] B[k]: the base ranks sit at linspace(0, R-1, K) and w[r, k] = f(|r - pos_k|), normalised
  over k, with f linear (1 - d/(R-1)), inverse-proportional (1/(d + 1e-5)) or Gaussian (exp(-d^2));
* ``plain`` learner (the CoOp baseline): one free embedding per rank (the identity interpolation);
* ``baseline`` (the official ``Baseline`` model, the paper's CNN baseline): no prompts and no text tower pass, R
  learned class prototypes in the image feature space (``ClassPrototypes``), compared by cosine at a fixed scale.

The sentence is assembled with one gather per forward (no per-rank Python loop): a bank holding the
template's token embeddings, the context and the rank tokens, and a fixed [R, L] index saying which
bank row fills each position.
"""
import logging
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import List, Optional

import torch
from torch import nn

_logger = logging.getLogger(__name__)

PROMPT_LEARNERS = ('rank', 'plain', 'baseline')
BASELINE_LOGIT_SCALE = 100.0  # the official Baseline: 100 * cos(image, prototype), no learned scale
RANK_TOKEN_POSITIONS = ('front', 'middle', 'tail')


def _linear(distance, num_ranks):
    return 1.0 - distance / (num_ranks - 1)


def _inv_prop(distance, num_ranks, eps=1e-5):
    return 1.0 / (distance + eps)


def _normal(distance, num_ranks):
    return torch.exp(-distance * distance)


INTERPOLATIONS = {'linear': _linear, 'inv_prop': _inv_prop, 'normal': _normal}
# Weights given as logs, normalised with a softmax: the official exp(-d^2) / sum underflows to 0 / 0 = NaN for
# ranks more than ~10 ranks from every base rank (e.g. 174 of 303 weights for 3 base ranks over 101 ranks,
# so training is NaN from the first step); the softmax is the same value wherever that is finite.
LOG_INTERPOLATIONS = {'normal': lambda distance, num_ranks: -distance * distance}


def interpolation_weights(interpolation_type: str, num_base_ranks: int, num_ranks: int,
                          dtype=torch.float32) -> torch.Tensor:
    """[num_ranks, num_base_ranks] weights, rows summing to 1 (the official RankPromptLearner's).

    Base ranks sit at linspace(0, R-1, K) (one base rank: at the middle); every rank is weighted over
    all base ranks by its distance to them, then normalised.
    """
    if interpolation_type not in INTERPOLATIONS:
        raise ValueError(f"ordinal_cfg.interpolation_type={interpolation_type!r}: use one of {list(INTERPOLATIONS)}.")
    ranks = torch.arange(num_ranks, dtype=dtype)[:, None]
    if num_base_ranks == 1:
        positions = torch.linspace(0, num_ranks - 1, 3, dtype=dtype)[1:2]
    else:
        positions = torch.linspace(0, num_ranks - 1, num_base_ranks, dtype=dtype)
    distance = (ranks - positions[None]).abs()
    if interpolation_type in LOG_INTERPOLATIONS:
        return LOG_INTERPOLATIONS[interpolation_type](distance, num_ranks).softmax(dim=-1)
    weights = INTERPOLATIONS[interpolation_type](distance, num_ranks)
    return weights / weights.sum(dim=-1, keepdim=True)


@dataclass
class OrdinalCfg:
    """The ``ordinal_cfg`` block of a model config (keys as the official ``prompt_learner_cfg``)."""
    prompt_learner: str = 'rank'
    num_ranks: int = 100
    num_base_ranks: int = 3
    num_tokens_per_rank: int = 1
    num_context_tokens: int = 10
    rank_tokens_position: str = 'tail'
    init_context: Optional[str] = None
    rank_names: Optional[List[str]] = None
    init_rank_path: Optional[str] = None
    rank_specific_context: bool = False
    interpolation_type: str = 'linear'

    @classmethod
    def from_dict(cls, cfg) -> 'OrdinalCfg':
        if isinstance(cfg, OrdinalCfg):
            return cfg
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg or {}) - known)
        if unknown:
            raise ValueError(f"ordinal_cfg has unknown key(s) {unknown}; known keys: {sorted(known)}.")
        out = cls(**(cfg or {}))
        out.validate()
        return out

    def validate(self):
        def bad(key, why):
            raise ValueError(f"ordinal_cfg.{key}={getattr(self, key)!r}: {why}")
        if self.prompt_learner not in PROMPT_LEARNERS:
            bad('prompt_learner', f"use one of {list(PROMPT_LEARNERS)}.")
        for key in ('num_ranks', 'num_tokens_per_rank'):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                bad(key, "must be a positive integer.")
        if self.num_ranks < 2:
            bad('num_ranks', "ordinal regression needs at least 2 ranks.")
        if not isinstance(self.num_context_tokens, int) or self.num_context_tokens < 0:
            bad('num_context_tokens', "must be a non-negative integer.")
        if self.prompt_learner == 'rank':
            if not isinstance(self.num_base_ranks, int) or self.num_base_ranks < 1:
                bad('num_base_ranks', "must be a positive integer.")
            if self.num_base_ranks == 1:
                bad('num_base_ranks', "one base rank makes every rank's prompt identical; use 2 or more.")
            if self.num_base_ranks > self.num_ranks:
                bad('num_base_ranks', f"must not exceed num_ranks={self.num_ranks}.")
        if self.prompt_learner == 'baseline':
            for key, unused in (('init_context', None), ('rank_names', None), ('init_rank_path', None),
                                ('rank_specific_context', False)):
                if getattr(self, key) != unused:
                    bad(key, "the baseline has no prompts (learned class prototypes only): leave it out.")
        if self.rank_tokens_position not in RANK_TOKEN_POSITIONS:
            bad('rank_tokens_position', f"use one of {list(RANK_TOKEN_POSITIONS)}.")
        if self.interpolation_type not in INTERPOLATIONS:
            bad('interpolation_type', f"use one of {list(INTERPOLATIONS)}.")
        if self.rank_names is not None and self.init_rank_path is not None:
            bad('rank_names', "give rank_names or init_rank_path, not both.")
        if self.rank_names is not None and (not isinstance(self.rank_names, (list, tuple))
                                            or not all(isinstance(n, str) and n.strip() for n in self.rank_names)):
            bad('rank_names', "must be a list of non-empty strings.")
        if self.init_context is not None and (not isinstance(self.init_context, str) or not self.init_context.strip()):
            bad('init_context', "must be a non-empty sentence.")
        if not isinstance(self.rank_specific_context, bool):
            bad('rank_specific_context', "must be true or false.")
        names = self.initial_rank_names()
        if names is not None and len(names) != self.num_learned_ranks:
            what = 'num_base_ranks' if self.prompt_learner == 'rank' else 'num_ranks'
            source = self.init_rank_path if self.init_rank_path is not None else 'rank_names'
            raise ValueError(
                f"ordinal_cfg: {source} holds {len(names)} rank names but {what} is {self.num_learned_ranks}: the "
                f"{self.prompt_learner} prompt learner initialises one embedding per "
                f"{'base rank' if self.prompt_learner == 'rank' else 'rank'}; give {self.num_learned_ranks} names.")

    @property
    def is_baseline(self) -> bool:
        """No prompts: R learned class prototypes (the official ``Baseline`` model)."""
        return self.prompt_learner == 'baseline'

    @property
    def num_learned_ranks(self) -> int:
        """How many rank embeddings are learned: the base ranks, or every rank for the plain learner."""
        return self.num_base_ranks if self.prompt_learner == 'rank' else self.num_ranks

    def initial_rank_names(self) -> Optional[List[str]]:
        if self.rank_names is not None:
            return [str(n) for n in self.rank_names]
        if self.init_rank_path is None:
            return None
        path = Path(self.init_rank_path)
        if not path.is_file():
            raise ValueError(f"ordinal_cfg.init_rank_path={self.init_rank_path!r} does not exist.")
        # one name a line, '_' read as a space (as the official reader)
        return [line.strip().replace('_', ' ') for line in path.read_text().splitlines() if line.strip()]


def _full_stop_id(tokenizer) -> int:
    ids = tokenizer.encode('.')
    if len(ids) != 1:
        raise ValueError("the text tower's tokenizer does not encode '.' as one token.")
    return ids[0]


class RankPrompts(nn.Module):
    """Learned context and rank token embeddings -> [R, L, W] sentence embeddings for the text tower.

    ``pseudo_tokens`` [R, L] are real token ids (``<sot>``, placeholders, ``.``, ``<eot>``, padding): the
    text tower embeds them (so the template follows its current token embedding) and pools at ``<eot>``;
    ``fill`` then writes the learned embeddings into the placeholder positions.
    Parameter names follow the official learners (``context_embeds``, ``rank_embeds``).
    """

    def __init__(self, cfg: OrdinalCfg, token_embedding: nn.Embedding, context_length: int, tokenizer):
        super().__init__()
        self.cfg = cfg
        self.num_ranks = cfg.num_ranks
        width = token_embedding.embedding_dim
        context_ids = self._context_ids(tokenizer)
        self.num_context_tokens = len(context_ids) if context_ids is not None else cfg.num_context_tokens
        name_ids = self._rank_name_ids(tokenizer)
        learned = cfg.num_learned_ranks
        if name_ids is not None:
            tokens_per_learned = [len(ids) for ids in name_ids]
        else:
            tokens_per_learned = [cfg.num_tokens_per_rank] * learned
        max_tokens = max(tokens_per_learned)
        if cfg.prompt_learner == 'rank':  # interpolated embeddings all use the longest base name's length
            tokens_per_rank = [max_tokens] * cfg.num_ranks
        else:
            tokens_per_rank = tokens_per_learned
        longest = 1 + self.num_context_tokens + max(tokens_per_rank) + 2  # <sot> ctx rank . <eot>
        if longest > context_length:
            raise ValueError(
                f"ordinal_cfg: a rank prompt needs {longest} tokens (<sot>, {self.num_context_tokens} context, "
                f"{max(tokens_per_rank)} rank, '.', <eot>) but the text tower's context_length is {context_length}; "
                f"shorten init_context / rank names or lower num_context_tokens / num_tokens_per_rank.")
        self.tokens_per_rank = tokens_per_rank

        ctx_shape = (self.num_context_tokens, width)
        if cfg.rank_specific_context:
            ctx_shape = (cfg.num_ranks,) + ctx_shape
        self.context_embeds = nn.Parameter(torch.empty(ctx_shape))
        self.rank_embeds = nn.Parameter(torch.empty(learned, max_tokens, width))
        if cfg.prompt_learner == 'rank':
            weights = interpolation_weights(cfg.interpolation_type, cfg.num_base_ranks, cfg.num_ranks)
        else:
            weights = torch.eye(cfg.num_ranks)
        self.register_buffer('interpolation_weights', weights, persistent=False)
        pseudo_tokens, slot_index, learned_mask = self._layout(context_length, tokenizer)
        self.register_buffer('pseudo_tokens', pseudo_tokens, persistent=False)
        self.register_buffer('slot_index', slot_index, persistent=False)
        self.register_buffer('learned_mask', learned_mask, persistent=False)
        self._context_ids_cache, self._name_ids_cache = context_ids, name_ids
        self.reset_parameters(token_embedding)

    # --- construction -----------------------------------------------------------------------------

    def _context_ids(self, tokenizer) -> Optional[List[int]]:
        if self.cfg.init_context is None:
            return None
        return tokenizer.encode(self.cfg.init_context.replace('_', ' '))

    def _rank_name_ids(self, tokenizer) -> Optional[List[List[int]]]:
        names = self.cfg.initial_rank_names()
        if names is None:
            return None
        ids = [tokenizer.encode(name) for name in names]
        empty = [n for n, i in zip(names, ids) if not i]
        if empty:
            raise ValueError(f"ordinal_cfg: rank name(s) {empty[:3]} tokenise to nothing.")
        return ids

    def _layout(self, context_length: int, tokenizer):
        """Token ids, bank index and learned-position mask of every rank's sentence.

        Bank rows (per rank): [0, L) the embedded pseudo tokens, then C context rows, then T_max rank rows.
        """
        R, C, L = self.cfg.num_ranks, self.num_context_tokens, context_length
        sot, eot, full_stop = tokenizer.sot_token_id, tokenizer.eot_token_id, _full_stop_id(tokenizer)
        tokens = torch.zeros(R, L, dtype=torch.long)
        slot = torch.arange(L).repeat(R, 1)
        learned = torch.zeros(R, L, dtype=torch.bool)
        context_slots = [('ctx', c) for c in range(C)]
        for r, T in enumerate(self.tokens_per_rank):
            rank_slots = [('rank', t) for t in range(T)]
            if self.cfg.rank_tokens_position == 'tail':
                order = context_slots + rank_slots
            elif self.cfg.rank_tokens_position == 'front':
                order = rank_slots + context_slots
            else:  # middle: the rank tokens split the context at C // 2
                order = context_slots[:C // 2] + rank_slots + context_slots[C // 2:]
            tokens[r, 0] = sot
            for p, (kind, i) in enumerate(order, start=1):
                slot[r, p] = L + i if kind == 'ctx' else L + C + i
                learned[r, p] = True
            tokens[r, len(order) + 1] = full_stop
            tokens[r, len(order) + 2] = eot
        return tokens, slot, learned

    @torch.no_grad()
    def reset_parameters(self, token_embedding: nn.Embedding):
        """Context from ``init_context``'s word embeddings (else N(0, 0.02)); rank embeddings from the rank
        names' word embeddings, zero-token padded (else N(0, 0.02)). Called again after base CLIP weights
        load, so word initialisations use the pretrained token embedding."""
        weight = token_embedding.weight
        if self._context_ids_cache is not None:
            context = weight[torch.tensor(self._context_ids_cache, device=weight.device)]
            self.context_embeds.copy_(context.expand_as(self.context_embeds))
        else:
            nn.init.normal_(self.context_embeds, std=0.02)
        if self._name_ids_cache is not None:
            ids = torch.zeros(self.rank_embeds.shape[:2], dtype=torch.long)
            for k, name_ids in enumerate(self._name_ids_cache):
                ids[k, :len(name_ids)] = torch.tensor(name_ids)
            self.rank_embeds.copy_(weight[ids.to(weight.device)])
        else:
            nn.init.normal_(self.rank_embeds, std=0.02)

    # --- forward ----------------------------------------------------------------------------------

    def rank_token_embeds(self) -> torch.Tensor:
        """[R, T, W]: each rank's embedding, interpolated from the learned (base) rank embeddings."""
        weights = self.interpolation_weights.to(self.rank_embeds.dtype)
        return torch.einsum('rk,ktw->rtw', weights, self.rank_embeds)

    def fill(self, template: torch.Tensor) -> torch.Tensor:
        """``template`` [R, L, W] (the text tower's embedding of ``pseudo_tokens``) with the learned
        context and rank embeddings written into their positions; gradients reach the learned ones only."""
        R, L, W = template.shape
        context = self.context_embeds.to(template.dtype)
        if context.dim() == 2:
            context = context.expand(R, -1, -1)
        bank = torch.cat([template, context, self.rank_token_embeds().to(template.dtype)], dim=1)
        return bank.gather(1, self.slot_index[..., None].expand(-1, -1, W))


class ClassPrototypes(nn.Module):
    """The official ``Baseline``'s head: R learned class prototypes [R, D] in the image feature space (its
    ``last_project.weight``, initialised as ``nn.Linear``'s weight), no text. Under ``prompt_learner.`` like the
    prompt learners, so checkpoints and base weights load the same way."""

    def __init__(self, num_ranks: int, dim: int):
        super().__init__()
        self.num_ranks = num_ranks
        self.prototypes = nn.Parameter(torch.empty(num_ranks, dim))
        nn.init.kaiming_uniform_(self.prototypes, a=math.sqrt(5))  # nn.Linear(dim, num_ranks)'s initialisation

    def reset_parameters(self, token_embedding=None):
        """Nothing comes from the text tower's embeddings: the prototypes keep their initialisation."""


def num_ranks_of_config(ordinal_cfg: dict) -> int:
    """The number of ranks an ``ordinal_cfg`` block predicts (the registry's ``RankFamily.num_ranks``)."""
    return int((ordinal_cfg or {}).get('num_ranks', OrdinalCfg.num_ranks))
