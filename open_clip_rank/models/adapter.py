"""The ranking-aware adapter family: OpenCLIP models with a rank adapter on top of both towers.

``RankAdapterCLIP`` extends OpenCLIP's ``CLIP`` (towers unpacked on the model, as the official
``L2RCLIP``), ``RankAdapterCustomTextCLIP`` extends ``CustomTextCLIP`` (e.g. SigLIP, which the
official code cannot build). ``open_clip.create_model`` builds them for any config carrying an
``adapter_cfg`` (see ``registry.py``), so every OpenCLIP option keeps working.
"""
import logging
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from open_clip.model import CLIP, CustomTextCLIP, CLIPTextCfg, CLIPVisionCfg
from open_clip.modified_resnet import ModifiedResNet
from open_clip.transformer import lock_text_tower, text_global_pool

from ..integration import compat
from ..data.feature_cache import CachedImages, tower_features_from_batch
from ..integration.run_state import current_run, run_flag
from .adapter_layers import MODEL_VERSION, AdapterCfg, RankAdapter, adapter_layers
from .base import RankModel, RankOutput, RankTexts
from .towers import (FrozenTextMemo, emit_tokens, encode_distinct_texts, image_tokens, image_tower_features,
                     tokens_from_tower_features, trainable_after_tower_features)

_logger = logging.getLogger(__name__)


def _vision_cfg(cfg) -> CLIPVisionCfg:
    return cfg if isinstance(cfg, CLIPVisionCfg) else CLIPVisionCfg(**cfg)


def _text_cfg(cfg) -> CLIPTextCfg:
    return cfg if isinstance(cfg, CLIPTextCfg) else CLIPTextCfg(**cfg)


def split_embed_dim(embed_dim):
    """``embed_dim`` is an int, or ``[clip_dim, token_dim]`` for ResNets (1x1 ``visual_proj`` conv)."""
    if isinstance(embed_dim, (list, tuple)):
        if len(embed_dim) != 2:
            raise ValueError(f"embed_dim must be an int or [clip_dim, token_dim], got {embed_dim}.")
        return int(embed_dim[0]), int(embed_dim[1])
    return int(embed_dim), None


def _is_resnet(vision_cfg: CLIPVisionCfg) -> bool:
    return isinstance(vision_cfg.layers, (list, tuple)) and not vision_cfg.timm_model_name


def visual_token_width(embed_dim, vision_cfg) -> int:
    """Width of the image tokens the adapter receives, from the config alone (no model needed)."""
    clip_dim, token_dim = split_embed_dim(embed_dim)
    vision_cfg = _vision_cfg(vision_cfg)
    if _is_resnet(vision_cfg):
        return token_dim if token_dim is not None else vision_cfg.width * 32
    return clip_dim  # ViT tokens @ proj, timm head (1x1 conv / linear) -> embed_dim


def check_adapter_config(embed_dim, vision_cfg, text_cfg, adapter_cfg: AdapterCfg, misc_cfg):
    """Fail before building anything when the towers' token widths cannot feed the adapter."""
    version = (misc_cfg or {}).get('model_version', MODEL_VERSION)
    if version != MODEL_VERSION:
        raise ValueError(f"misc_cfg.model_version={version!r} is not supported; use {MODEL_VERSION!r}.")
    vision_cfg = _vision_cfg(vision_cfg)
    if split_embed_dim(embed_dim)[1] is not None and not _is_resnet(vision_cfg):
        raise ValueError(f"embed_dim={embed_dim} as [clip_dim, token_dim] is only for ModifiedResNet towers.")
    if vision_cfg.timm_model_name and vision_cfg.timm_pool:
        raise ValueError(
            f"vision_cfg.timm_pool={vision_cfg.timm_pool!r} pools the image to one vector; the adapter "
            f"needs its tokens: set timm_pool to \"\" (and timm_proj to \"\").")
    checks = (('visual token width (embed_dim)', visual_token_width(embed_dim, vision_cfg)),
              ('text token width (text_cfg.width)', _text_cfg(text_cfg).width))
    for what, width in checks:
        if width != adapter_cfg.d_model:
            raise ValueError(
                f"adapter_cfg.d_model={adapter_cfg.d_model} does not match the {what} {width}; "
                f"set adapter_cfg.d_model to {width} or change the tower config.")


def _log_trainable(what: str, module: nn.Module, policy: str):
    params = list(module.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    _logger.info(f"{what} locked ({policy}): {trainable:,} of {sum(p.numel() for p in params):,} parameters trainable.")


class AdapterOutput(RankOutput):
    """Rank outputs of an adapter model; the official output names read as aliases:
    ``adapter_logits`` = ``rank_scores`` as [N, 1], ``adapter_paired_logits`` = ``pair_logits`` as [N*N, 1]
    (row i*N + j: pair (i, j))."""
    ALIASES = {
        'adapter_logits': lambda out: out['rank_scores'].unsqueeze(-1),
        'adapter_paired_logits': lambda out: out['pair_logits'].reshape(-1, 1),
    }


compat.register_output_type(AdapterOutput)


class RankAdapterMixin(RankModel):
    """Adapter construction, the rank forward and the rank-model protocol shared by both classes."""

    family_name = 'adapter'
    fresh_state_prefixes = ('adapter.', 'visual_proj.')  # what a base CLIP checkpoint cannot have
    supports_pairwise = True

    def _init_rank_adapter(self, embed_dim, vision_cfg, adapter_cfg, quick_gelu, cast_dtype):
        _, token_dim = split_embed_dim(embed_dim)
        if token_dim is not None:
            channels = _vision_cfg(vision_cfg).width * 32  # ModifiedResNet layer-4 channels
            self.visual_proj = nn.Conv2d(channels, token_dim, kernel_size=1, bias=False)
        else:
            self.visual_proj = None
        emit_tokens(self.visual)
        act_layer, norm_layer = adapter_layers(quick_gelu, cast_dtype)
        self.adapter_cfg = adapter_cfg
        self.adapter = RankAdapter(adapter_cfg, act_layer=act_layer, norm_layer=norm_layer)
        self.supports_pairwise = self.adapter.has_pair_head  # the 'softmax' / 'sigmoid' ablations have none
        self._freeze_contrastive_only_parameters()

    def _freeze_contrastive_only_parameters(self):
        """Parameters no rank output depends on get no gradient, which DDP (without
        find_unused_parameters) and optimizers must not wait for: freeze them."""
        unused = [self.logit_scale, self.logit_bias]
        text_tower = getattr(self, 'text', self)  # CustomTextCLIP keeps its text tower in .text
        projection = getattr(text_tower, 'text_projection', None)
        unused += list(projection.parameters()) if isinstance(projection, nn.Module) else [projection]
        if isinstance(self.visual, ModifiedResNet):
            unused += list(self.visual.attnpool.parameters())  # the adapter reads the layer-4 map
        for param in unused:
            if param is not None:
                param.requires_grad_(False)

    @torch.jit.ignore
    def lock_image_tower(self, unlocked_groups: int = 0, freeze_bn_stats: bool = False):
        """``--lock-image``: OpenCLIP's lock, then, as the original code ("locking image tower but not proj"),
        a ViT's ``visual.proj`` trains again; ``--strict-tower-lock`` keeps the whole tower frozen."""
        super().lock_image_tower(unlocked_groups=unlocked_groups, freeze_bn_stats=freeze_bn_stats)
        strict = run_flag('strict_tower_lock')
        if not strict and isinstance(getattr(self.visual, 'proj', None), nn.Parameter):
            self.visual.proj.requires_grad_(True)
        _log_trainable('Image tower', self.visual, 'strict' if strict else 'as the original: visual.proj trains')
        if run_flag('lock_image_eval'):
            # --lock-image-eval: a frozen tower's stochastic depth, dropout and BatchNorm batch statistics only make
            # its features random; run it as at evaluation (this is also what --rank-feature-cache can store)
            self.image_tower_eval = True
            self.train(self.training)  # train() keeps the locked tower in eval mode from now on
            _logger.info("Image tower locked in eval mode (--lock-image-eval): no stochastic depth, dropout or "
                         "BatchNorm batch statistics while training.")
        run = current_run()
        if run is not None:  # --rank-feature-cache builds its data side from the locked model
            run.note_locked_model(self)

    def _text_transformer(self) -> nn.Module:
        raise NotImplementedError

    def _lock_text_strictly(self, unlocked_layers: int):
        raise NotImplementedError

    def lock_text_tower(self, unlocked_layers: int = 0, freeze_layer_norm: bool = True):
        """``--lock-text``: as the original code, only the text transformer blocks freeze (token and positional
        embeddings and ``ln_final`` keep training; the text projection feeds no rank output and stays frozen);
        ``--strict-tower-lock`` freezes the tower,
        LayerNorms included (OpenCLIP 3.3's ``CLIP.lock_text_tower`` asserts ``freeze_layer_norm``, which its CLI
        passes as False unless ``--lock-text-freeze-layer-norm``: that assertion is not reproduced)."""
        if run_flag('strict_tower_lock'):
            self._lock_text_strictly(unlocked_layers)
            policy = 'strict'
        else:
            self._text_transformer().requires_grad_(False)
            policy = 'as the original: transformer blocks only'
        _log_trainable('Text tower', self._text_tower_module(), policy)

    def set_grad_checkpointing(self, enable=True):
        super().set_grad_checkpointing(enable)
        self.adapter.set_grad_checkpointing(enable)

    image_tower_eval = False  # --lock-image-eval (set by lock_image_tower)

    def train(self, mode: bool = True):
        """``nn.Module.train``; with ``--lock-image-eval`` the locked image tower stays in eval mode."""
        super().train(mode)
        if mode and self.image_tower_eval:
            self.visual.train(False)
        return self

    def rank_forward(
            self,
            image: torch.Tensor,
            text,
            targets: Optional[torch.Tensor] = None,
            with_pairs: bool = True,
    ) -> AdapterOutput:
        """Rank a batch of images under their instructions.

        Returns ``rank_scores`` [N] (regression head), ``pair_logits`` [N, N] (entry (i, j) > 0:
        image i ranks above image j; omitted when ``with_pairs=False``), ``targets`` when given,
        ``image_tokens`` (the adapter's image tokens [N, P, D]), ``text_features`` (pooled, projected,
        not normalised), ``logit_scale`` (and ``logit_bias``) as OpenCLIP models do. A training batch of
        ``--rank-global-pairs`` (``RankTexts.global_pairs``) returns ``pair_summaries`` (the per-image tuple
        of ``pair_summaries``) and ``pair_logits_between`` (the pair head, a callable) instead of
        ``pair_logits``.
        """
        global_pairs = False
        if isinstance(text, RankTexts):  # a rank batch from open_clip_rank.data carries its targets
            targets = text.targets if targets is None else targets
            with_pairs = with_pairs and text.with_pairs
            global_pairs = with_pairs and text.global_pairs
            text = text.tokens
        tokens = self.encode_image_tokens(image)
        # the text side once per distinct caption: the text tower (from the memo while it is frozen) and the
        # fusion's key/value projections
        text_features, text_tokens, text_index = encode_distinct_texts(self._encode_text_tokens_memo, text)
        if text_index is not None:
            text_features = text_features[text_index]
        text_tokens = text_tokens.to(tokens.dtype)
        if global_pairs:
            # --rank-global-pairs: per-image pair summaries (o [N, H, Q, d] and L [N, H, Q]; the token mean for
            # the 'null' pooler) and the pair head, instead of the local [N, N] logits; the loss gathers the
            # summaries of all processes and forms the pairs (losses/ranking.py).
            fused = self.adapter.fuse(tokens, text_tokens, text_index)
            scores, pair_logits = self.adapter.scores(fused), None
        else:
            scores, pair_logits = self.adapter(tokens, text_tokens, with_pairs, text_index)
        out = AdapterOutput(rank_scores=scores, image_tokens=tokens, text_features=text_features,
                            logit_scale=self.logit_scale.exp())
        if pair_logits is not None:
            out['pair_logits'] = pair_logits
        if global_pairs:
            out['pair_summaries'] = self.adapter.pair_summaries(fused)
            out['pair_logits_between'] = self.adapter.pair_logits_between
        if targets is not None:
            out['targets'] = targets
        if self.logit_bias is not None:
            out['logit_bias'] = self.logit_bias
        return out

    def _encode_text_tokens_memo(self, text: torch.Tensor):
        """``encode_text_tokens``, kept per caption while the text tower is frozen (``towers.FrozenTextMemo``)."""
        memo = getattr(self, '_frozen_text_memo', None)
        if memo is None:
            memo = self._frozen_text_memo = FrozenTextMemo()
        return memo.encode(self.encode_text_tokens, text, self._text_tower_module())

    # --- rank-model protocol -------------------------------------------------------------------------

    def encode_image_tokens(self, image) -> torch.Tensor:
        """Image -> [N, P, D] tokens: ViT patch tokens after ln_post @ proj, CNN maps flattened. ``image`` may be
        a ``feature_cache.CachedImages`` batch (``--rank-feature-cache``): the frozen part then runs on its misses
        only, the trainable rest (``visual.proj``, ``visual_proj``) on every image."""
        if isinstance(image, CachedImages):
            features = tower_features_from_batch(self.visual, image, self.image_tower_features)
            return tokens_from_tower_features(self.visual, features, map_proj=self.visual_proj)
        return image_tokens(self.visual, image, map_proj=self.visual_proj)

    def image_tower_features(self, image: torch.Tensor) -> torch.Tensor:
        """The frozen part of ``encode_image_tokens`` (what ``--rank-feature-cache`` stores)."""
        return image_tower_features(self.visual, image)

    def image_tower_trainable_after_cache(self):
        """``visual`` parameters applied after the cached part (a ViT's ``proj``)."""
        return trainable_after_tower_features(self.visual)

    def encode_prompts(self, text: torch.Tensor) -> torch.Tensor:
        """Instructions -> their text tokens after the final LayerNorm [T, L, W]."""
        return self.encode_text_tokens(text)[1]

    def score_tokens(self, image_tokens: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """[N] regression-head scores; ``prompts`` holds one prompt per image or one for all."""
        return self.adapter.scores(self._fuse(image_tokens, prompts))

    def pair_summaries(self, image_tokens: torch.Tensor, prompts: torch.Tensor):
        """Per-image pair-head statistics under a prompt; pairs are then formed blockwise."""
        return self.adapter.pair_summaries(self._fuse(image_tokens, prompts))

    def pair_logits_between(self, summaries_i, summaries_j) -> torch.Tensor:
        """[I, J] pair logits: entry (i, j) > 0 means image i ranks above image j."""
        return self.adapter.pair_logits_between(summaries_i, summaries_j)

    def _fuse(self, image_tokens, prompts):
        # one prompt for all images stays one row: the fusion's text side runs once, not once per image
        return self.adapter.fuse(image_tokens, prompts.to(image_tokens.dtype))


class RankAdapterCLIP(RankAdapterMixin, CLIP):
    """OpenCLIP ``CLIP`` + ranking-aware adapter; state-dict compatible with the official ``L2RCLIP``."""

    def __init__(self, embed_dim, vision_cfg, text_cfg, adapter_cfg, misc_cfg=None,
                 quick_gelu: bool = False, cast_dtype: Optional[torch.dtype] = None, **kwargs):
        adapter_cfg = AdapterCfg.from_dict(adapter_cfg)
        check_adapter_config(embed_dim, vision_cfg, text_cfg, adapter_cfg, misc_cfg)
        clip_dim, _ = split_embed_dim(embed_dim)
        super().__init__(clip_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu, cast_dtype=cast_dtype, **kwargs)
        self._init_rank_adapter(embed_dim, vision_cfg, adapter_cfg, quick_gelu, cast_dtype)

    def _text_transformer(self) -> nn.Module:
        return self.transformer

    def _lock_text_strictly(self, unlocked_layers: int):
        lock_text_tower(self, unlocked_layers)

    def _text_tower_module(self) -> nn.Module:
        """The text tower's parameters, gathered (a CLIP keeps them on the model itself)."""
        parts = [self.token_embedding, self.transformer, self.ln_final]
        tower = nn.ModuleList(parts)
        tower.register_parameter('positional_embedding', self.positional_embedding)
        if isinstance(self.text_projection, nn.Parameter):
            tower.register_parameter('text_projection', self.text_projection)
        return tower

    def encode_text_tokens(self, text: torch.Tensor):
        """-> (pooled projected features [N, E], all context tokens after ln_final [N, L, W])."""
        cast_dtype = self.transformer.get_cast_dtype()
        x = self.token_embedding(text).to(cast_dtype) + self.positional_embedding.to(cast_dtype)
        x = self.ln_final(self.transformer(x, attn_mask=self.attn_mask))
        pooled = text_global_pool(x, text, self.text_pool_type, eos_token_id=getattr(self, 'text_eos_id', None))
        if self.text_projection is not None:
            if isinstance(self.text_projection, nn.Linear):
                pooled = self.text_projection(pooled)
            else:
                pooled = pooled @ self.text_projection
        return pooled, x


class RankAdapterCustomTextCLIP(RankAdapterMixin, CustomTextCLIP):
    """OpenCLIP ``CustomTextCLIP`` (separate ``text`` tower, e.g. SigLIP) + ranking-aware adapter."""

    def __init__(self, embed_dim, vision_cfg, text_cfg, adapter_cfg, misc_cfg=None,
                 quick_gelu: bool = False, cast_dtype: Optional[torch.dtype] = None, **kwargs):
        adapter_cfg = AdapterCfg.from_dict(adapter_cfg)
        check_adapter_config(embed_dim, vision_cfg, text_cfg, adapter_cfg, misc_cfg)
        super().__init__(embed_dim, vision_cfg, text_cfg, quick_gelu=quick_gelu, cast_dtype=cast_dtype, **kwargs)
        self.text.output_tokens = True
        self._init_rank_adapter(embed_dim, vision_cfg, adapter_cfg, quick_gelu, cast_dtype)

    def _text_transformer(self) -> nn.Module:
        return self.text.transformer

    def _lock_text_strictly(self, unlocked_layers: int):
        self.text.lock(unlocked_layers, freeze_layer_norm=True)

    def _text_tower_module(self) -> nn.Module:
        return self.text

    def encode_text(self, text, normalize: bool = False):
        features, _ = self.text(text)
        return F.normalize(features, dim=-1) if normalize else features

    def encode_text_tokens(self, text: torch.Tensor):
        return self.text(text)
