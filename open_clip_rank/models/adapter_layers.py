"""The ranking-aware adapter (Yu et al., ICLR 2025) as plain PyTorch modules.

Module and parameter names follow the official ``RankAdapterV2`` so official checkpoints load
key for key. What differs is how the pair head is computed: the official code materialises an
``[N*N, heads, queries, 2*P]`` attention tensor; ``RankAwarePairAttention`` gets the same values from
per-image statistics (see its docstring), so memory grows with N*N*D instead of N*N*P*D.
"""
from dataclasses import dataclass, fields
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from open_clip.transformer import LayerNorm, LayerNormFp32, QuickGELU, ResidualAttentionBlock

from ..integration import compat

compat.check_torch_private_names()  # PostFuseLayer overrides TransformerEncoderLayer._sa_block

MODEL_VERSION = 'clip-adapter-v2'


@dataclass
class AdapterCfg:
    """``adapter_cfg`` of the official ``*-adapter.json`` configs (same keys, same defaults)."""
    num_layers: int = 2
    d_model: int = 768
    n_head: int = 8  # heads of the post-fusion TransformerEncoder
    num_learnable_text_tokens: int = 0
    adapter_attention_pooler: str = 'rank-attn'
    cross_attn_method: str = 'cross-qkv'
    reg_token_method: str = 'cross-attn-sum'  # 'null' drops the post-fusion encoder
    n_reg_tokens: int = 16
    # The official code hard-codes 8 heads in the fusion block and the pair head; kept as defaults.
    fusion_heads: int = 8
    pair_heads: int = 8

    @classmethod
    def from_dict(cls, cfg):
        if isinstance(cfg, cls):
            return cfg
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(cfg) - known)
        if unknown:
            raise ValueError(
                f"adapter_cfg has unknown key(s) {unknown}; allowed keys are {sorted(known)}. "
                f"Remove or rename them in the model config.")
        out = cls(**cfg)
        out.validate()
        return out

    def validate(self):
        if self.cross_attn_method != 'cross-qkv':
            raise ValueError(
                f"adapter_cfg.cross_attn_method={self.cross_attn_method!r} cannot run in the original code either (its "
                f"constructor raises NotImplementedError for anything but 'cross-qkv', and its Identity fusion is "
                f"called with two inputs); use 'cross-qkv'.")
        if self.adapter_attention_pooler not in POOLERS:
            raise ValueError(f"adapter_cfg.adapter_attention_pooler={self.adapter_attention_pooler!r} is not supported; "
                             f"use one of {list(POOLERS)}.")
        if self.reg_token_method not in ('cross-attn-sum', 'null'):
            raise ValueError(f"adapter_cfg.reg_token_method={self.reg_token_method!r}: use 'cross-attn-sum' or 'null'.")
        for key in ('d_model', 'num_layers'):
            if getattr(self, key) <= 0:
                raise ValueError(f"adapter_cfg.{key} must be positive, got {getattr(self, key)}.")
        if self.n_reg_tokens < 0:
            raise ValueError(f"adapter_cfg.n_reg_tokens must be >= 0, got {self.n_reg_tokens}.")
        if self.n_reg_tokens == 0 and self.adapter_attention_pooler == 'rank-attn':
            raise ValueError(
                "adapter_cfg.n_reg_tokens=0 leaves the 'rank-attn' pooler without queries (the original code then "
                "fails on its missing reg_tokens); with 0 tokens the original pools by averaging: set "
                "adapter_attention_pooler to 'null'.")
        for key in ('n_head', 'fusion_heads', 'pair_heads'):
            if self.d_model % getattr(self, key):
                raise ValueError(
                    f"adapter_cfg.d_model={self.d_model} is not divisible by {key}={getattr(self, key)}.")


# 'rank-attn': the paper's rank-aware attention over image pairs; 'null' (the paper's ablation): the pair head
# reads the difference of the two images' token means; 'softmax' / 'sigmoid' (ablations): learned queries pool
# each image's tokens on their own (no pairs), as the original's AttentionalPooler.
POOLERS = ('rank-attn', 'null', 'softmax', 'sigmoid')
PER_IMAGE_POOLERS = ('softmax', 'sigmoid')


def adapter_layers(quick_gelu: bool, cast_dtype: Optional[torch.dtype]):
    """Activation and norm classes, chosen exactly as OpenCLIP does for its towers."""
    act_layer = QuickGELU if quick_gelu else nn.GELU
    norm_layer = LayerNormFp32 if cast_dtype in (torch.float16, torch.bfloat16) else LayerNorm
    return act_layer, norm_layer


def attention_heads(attn: nn.MultiheadAttention, q_x: torch.Tensor, kv_x: torch.Tensor, dropout_p: float = 0.0,
                    kv_index: Optional[torch.Tensor] = None):
    """``nn.MultiheadAttention(q_x, kv_x, kv_x, need_weights=False)`` (batch first, no mask) through
    ``F.scaled_dot_product_attention``. Same weights (``in_proj_weight`` packed q|k|v, ``out_proj``), same math;
    without dropout it takes the fused kernel, which keeps q, k, v, the output and the log-sum-exp for backward
    (no [N, H, L, S] attention matrix). With dropout (``nn.TransformerEncoderLayer`` in training) it takes the
    same math path as ``nn.MultiheadAttention`` does, so the dropout masks draw the same random numbers.

    Cross-attention over shared key/value rows: ``kv_x`` may hold U distinct rows for the N query rows, with
    ``kv_index`` [N] naming each query row's one (or U = 1 and no index: one for all). Keys and values are then
    projected once per distinct row, not once per image (a rank batch shares one instruction): the same values,
    and the same gradients (the gather's backward sums the rows' contributions)."""
    q, k, v = project_heads(attn, q_x, kv_x)
    k, v = (rows_for_queries(t, q_x.shape[0], kv_index) for t in (k, v))
    return merge_heads(attn, F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p))


def project_heads(attn: nn.MultiheadAttention, q_x: torch.Tensor, kv_x: torch.Tensor):
    """q, k, v [rows, H, L, d_head] from ``attn``'s packed q|k|v projection (one matmul for self-attention)."""
    width = q_x.shape[-1]
    weight, bias = attn.in_proj_weight, attn.in_proj_bias
    if kv_x is q_x:
        q, k, v = F.linear(q_x, weight, bias).chunk(3, dim=-1)
    else:
        w_q, w_kv = weight.split([width, 2 * width])
        b_q, b_kv = bias.split([width, 2 * width]) if bias is not None else (None, None)
        q = F.linear(q_x, w_q, b_q)
        k, v = F.linear(kv_x, w_kv, b_kv).chunk(2, dim=-1)
    return tuple(t.unflatten(-1, (attn.num_heads, -1)).transpose(1, 2) for t in (q, k, v))


def merge_heads(attn: nn.MultiheadAttention, out: torch.Tensor) -> torch.Tensor:
    """[N, H, L, d_head] per-head outputs -> [N, L, D] through ``attn``'s output projection."""
    return F.linear(out.transpose(1, 2).flatten(2), attn.out_proj.weight, attn.out_proj.bias)


def rows_for_queries(rows: torch.Tensor, n: int, index: Optional[torch.Tensor]) -> torch.Tensor:
    """[U, ...] shared rows -> [N, ...], one per query row: gathered by ``index``, or one row broadcast (a view,
    no copy); N rows and no index pass through."""
    if index is not None:
        return rows.index_select(0, index.to(rows.device))
    if rows.shape[0] == n:
        return rows
    if rows.shape[0] == 1:
        return rows.expand(n, *rows.shape[1:])
    raise ValueError(f"{rows.shape[0]} key/value rows for {n} query rows: pass an index naming each query's row.")


class _ActLinear(torch.autograd.Function):
    """``F.linear(act(h), weight, bias)`` keeping only ``h`` for backward: ``act(h)`` (elementwise, cheap) is
    recomputed there instead of being stored next to ``h``. Same values and gradients as the two ops; under
    autocast the linear runs in the dtype autocast gave it, as ``F.linear`` would.

    Backward holds at most two [.., hidden]-sized buffers besides ``h`` (the MLP's widest tensors): ``act(h)``
    lives only for the weight gradient, then grad_a = grad_out @ W and grad_h = act'(h) * grad_a."""

    @staticmethod
    def forward(ctx, h, weight, bias, act):
        with torch.no_grad():
            a = act(h)
            out = F.linear(a, weight, bias)  # autocast (if on) casts a, weight and bias here
        ctx.act, ctx.compute_dtype, ctx.has_bias = act, out.dtype, bias is not None
        ctx.save_for_backward(h, weight)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        h, weight = ctx.saved_tensors
        dt = ctx.compute_dtype
        grad_flat = grad_out.reshape(-1, grad_out.shape[-1])
        grad_weight = grad_bias = grad_h = None
        if ctx.needs_input_grad[1]:
            with torch.no_grad():
                a = ctx.act(h).to(dt)
            grad_weight = (grad_flat.t() @ a.reshape(-1, a.shape[-1])).to(weight.dtype)
            del a
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad_flat.sum(dim=0).to(weight.dtype)
        if ctx.needs_input_grad[0]:
            grad_h = _activation_backward(ctx.act, h, grad_out @ weight.to(dt))
        return grad_h, grad_weight, grad_bias, None


def _activation_backward(act: Callable, h: torch.Tensor, grad_a: torch.Tensor) -> torch.Tensor:
    """act'(h) * grad_a, in h's dtype. nn.GELU through its backward kernel, which needs h only (no act(h) buffer);
    any other activation through autograd."""
    grad_a = grad_a.to(h.dtype)
    if type(act) is nn.GELU:
        return torch.ops.aten.gelu_backward(grad_a, h, approximate=act.approximate)
    with torch.enable_grad():
        h_ = h.detach().requires_grad_(True)
        return torch.autograd.grad(act(h_), h_, grad_a)[0]


def act_linear(h: torch.Tensor, act: Callable, linear: nn.Linear) -> torch.Tensor:
    if torch.is_grad_enabled() and (h.requires_grad or linear.weight.requires_grad):
        return _ActLinear.apply(h, linear.weight, linear.bias, act)
    return linear(act(h))


class FusionBlock(ResidualAttentionBlock):
    """OpenCLIP's ``ResidualAttentionBlock`` (same parameters and names, same math) with a leaner training step:
    attention through ``F.scaled_dot_product_attention`` (``attention_heads``), the cross block's text LayerNorm
    applied once for keys and values, and the MLP's activation recomputed in backward instead of stored."""

    def forward(self, q_x: torch.Tensor, k_x: Optional[torch.Tensor] = None, v_x: Optional[torch.Tensor] = None,
                attn_mask: Optional[torch.Tensor] = None, kv_index: Optional[torch.Tensor] = None):
        """``kv_index``: ``k_x`` holds distinct text rows, ``kv_index`` [N] names each image's (``attention_heads``);
        the key LayerNorm and the key/value projection then run once per distinct text."""
        if attn_mask is not None or (v_x is not None and v_x is not k_x):
            if kv_index is not None or k_x is not None and k_x.shape[0] != q_x.shape[0]:
                raise ValueError("shared key/value rows need the adapter's own path (no attn_mask, v_x is k_x).")
            return super().forward(q_x, k_x, v_x, attn_mask)  # not used by the adapter: OpenCLIP's own path
        if k_x is not None and hasattr(self, 'ln_1_kv'):
            k_x = self.ln_1_kv(k_x)
        x = self.ln_1(q_x)
        x = q_x + self.ls_1(attention_heads(self.attn, x, x if k_x is None else k_x, kv_index=kv_index))
        h = self.mlp.c_fc(self.ln_2(x))
        return x + self.ls_2(act_linear(h, self.mlp.gelu, self.mlp.c_proj))


class CrossModalFusion(nn.Module):
    """Per layer: self-attention over image tokens, then image->text cross-attention; LN; projection."""

    def __init__(self, width: int, layers: int, heads: int, act_layer: Callable, norm_layer: Callable,
                 output_dim: Optional[int] = None, mlp_ratio: float = 4.0):
        super().__init__()
        output_dim = output_dim or width
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([
            FusionBlock(width, heads, mlp_ratio, act_layer=act_layer, norm_layer=norm_layer)
            for _ in range(layers)])
        self.cross_attn = nn.ModuleList([
            FusionBlock(width, heads, mlp_ratio, act_layer=act_layer, norm_layer=norm_layer, is_cross_attention=True)
            for _ in range(layers)])
        self.ln_final = norm_layer(width)
        # The official module allocates this with torch.empty and never initialises it.
        self.projection = nn.Parameter(torch.empty(width, output_dim))
        nn.init.normal_(self.projection, std=width ** -0.5)

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
                text_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, P, D] image tokens attend to text tokens: [N, T, D], or U distinct texts [U, T, D] with
        ``text_index`` [N] (or U = 1: one text for all)."""
        x = image_tokens
        for self_block, cross_block in zip(self.resblocks, self.cross_attn):
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(self_block, x, use_reentrant=False)
                x = checkpoint(cross_block, x, text_tokens, text_tokens, None, text_index, use_reentrant=False)
            else:
                x = self_block(x)
                x = cross_block(x, k_x=text_tokens, v_x=text_tokens, kv_index=text_index)
        return self.ln_final(x) @ self.projection.to(x.dtype)


class PostFuseLayer(nn.TransformerEncoderLayer):
    """``nn.TransformerEncoderLayer`` (post-norm, same parameters and names) whose self-attention goes through
    ``attention_heads``: the fused kernel when dropout is off, the same math (and dropout draws) as
    ``nn.MultiheadAttention`` when it is on. Only the layout the adapter builds (batch first, post-norm, no masks)
    takes this path; anything else, and inference without gradients (PyTorch's fused fast path), is the parent's."""

    def forward(self, src, src_mask=None, src_key_padding_mask=None, is_causal=False):
        if (src_mask is not None or src_key_padding_mask is not None or self.norm_first or not self.self_attn.batch_first
                or not torch.is_grad_enabled()):
            return super().forward(src, src_mask, src_key_padding_mask, is_causal)
        x = src
        x = self.norm1(x + self._sa_block(x, None, None, is_causal))
        x = self.norm2(x + self._ff_block(x))
        return x

    def _sa_block(self, x, attn_mask, key_padding_mask, is_causal=False):
        if attn_mask is not None or key_padding_mask is not None:
            return super()._sa_block(x, attn_mask, key_padding_mask, is_causal)
        dropout_p = self.self_attn.dropout if self.training else 0.0
        return self.dropout1(attention_heads(self.self_attn, x, x, dropout_p=dropout_p))


class PostFuseEncoder(nn.TransformerEncoder):
    """``nn.TransformerEncoder`` of ``PostFuseLayer``s; with ``grad_checkpointing`` each layer is recomputed in
    backward (random state preserved, so dropout draws the same masks)."""

    grad_checkpointing = False

    def forward(self, src, mask=None, src_key_padding_mask=None, is_causal=None):
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()) or mask is not None \
                or src_key_padding_mask is not None or self.norm is not None:
            return super().forward(src, mask=mask, src_key_padding_mask=src_key_padding_mask, is_causal=is_causal)
        x = src
        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=False)
        return x


class RankAwarePairAttention(nn.Module):
    """Learnable queries attend jointly over the tokens of images i and j; i's share minus j's.

    For one head and one query let s_i = q.k_i / sqrt(d) over image i's P tokens, L_i = logsumexp(s_i)
    and o_i = softmax(s_i) @ v_i. A softmax over the concatenation [k_i; k_j] splits into
        out(i, j) = sigmoid(L_i - L_j) * o_i - sigmoid(L_j - L_i) * o_j,
    so o and L are computed once per image and only the O(N*N*Q*D) combination is pairwise.
    Keys and values are the same projection (``kv_proj``), as in the official module.
    """

    def __init__(self, d_model: int, num_heads: int, norm_layer: Callable):
        super().__init__()
        self.num_heads = num_heads
        self.d_head = d_model // num_heads
        self.scale = self.d_head ** -0.5
        self.ln_q = norm_layer(d_model)
        self.ln_kv = norm_layer(d_model)
        self.q_proj = nn.Linear(d_model, d_model)
        self.kv_proj = nn.Linear(d_model, d_model)
        self.out_proj = nn.Linear(d_model, d_model)

    def per_image_summaries(self, queries: torch.Tensor, tokens: torch.Tensor):
        """Returns o [N, H, Q, d_head] and L [N, H, Q] (at least float32) for every image."""
        n, p, d = tokens.shape
        q = self.ln_q(self.q_proj(queries)).view(-1, self.num_heads, self.d_head)
        kv = self.ln_kv(self.kv_proj(tokens)).view(n, p, self.num_heads, self.d_head)
        logits = torch.einsum('qhd,nphd->nhqp', q, kv)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) * self.scale  # softmax stats in >= fp32
        log_norm = torch.logsumexp(logits, dim=-1)
        attn = torch.exp(logits - log_norm.unsqueeze(-1)).to(kv.dtype)
        values = torch.einsum('nhqp,nphd->nhqd', attn, kv)
        return values, log_norm

    def pair_features(self, values_i, log_norm_i, values_j, log_norm_j, n_queries: int) -> torch.Tensor:
        """Pairs (i, j) of two sets of per-image summaries -> [I, J, D], already summed over queries."""
        # weight of i's share in pair (i, j): [I, J, H, Q]
        w = torch.sigmoid(log_norm_i.unsqueeze(1) - log_norm_j.unsqueeze(0)).to(values_i.dtype)
        own = torch.einsum('ijhq,ihqd->ijhd', w, values_i)  # sum_q w_ij o_i
        other = torch.einsum('ijhq,jhqd->ijhd', w, values_j)  # sum_q w_ij o_j
        # sum_q [w o_i - (1 - w) o_j] = own + other - sum_q o_j
        pair = own + other - values_j.sum(dim=2).unsqueeze(0)
        pair = pair.reshape(pair.shape[0], pair.shape[1], -1)
        # out_proj is affine: summing its outputs over Q queries = projecting the sum + Q * bias
        return F.linear(pair, self.out_proj.weight, n_queries * self.out_proj.bias)

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """queries [Q, D], tokens [N, P, D] -> pair features [N, N, D], already summed over queries."""
        values, log_norm = self.per_image_summaries(queries, tokens)
        return self.pair_features(values, log_norm, values, log_norm, queries.shape[0])


class AttentionalPooler(nn.Module):
    """The original's ``AttentionalPooler`` for the 'softmax' / 'sigmoid' ablations (its parameter names:
    ``query``, ``attn.in_proj_*``, ``attn.out_proj``, ``ln_q``, ``ln_k``): Q learned queries attend over one
    image's fused tokens, [N, P, D] -> [N, Q, D].

    'softmax': ``nn.MultiheadAttention`` (8 heads). 'sigmoid': the original's ``MultiheadAttentionDistributed``,
    the same projections with each attention weight sigmoid(q·k / sqrt(d_head)) / H instead of a softmax over the
    tokens, and dropout 0.1 on those weights in training."""

    def __init__(self, d_model: int, n_queries: int, normaliser: str, n_head: int = 8):
        super().__init__()
        self.normaliser = normaliser
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.attn = nn.MultiheadAttention(d_model, n_head, dropout=0.1 if normaliser == 'sigmoid' else 0.0)
        self.ln_q = LayerNorm(d_model)  # the original's default norm layer, whatever the towers use
        self.ln_k = LayerNorm(d_model)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.ln_k(tokens)
        queries = self.ln_q(self.query).to(keys.dtype).unsqueeze(0).expand(keys.shape[0], -1, -1)
        if self.normaliser == 'softmax':
            return attention_heads(self.attn, queries, keys)
        return self._sigmoid_attention(queries, keys)

    def _sigmoid_attention(self, queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        q, k, v = project_heads(self.attn, queries, keys)  # [N, H, Q or P, d_head]
        # not normalised over the tokens: each weight on its own, scaled by 1/H
        weights = torch.sigmoid(q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5) / self.attn.num_heads
        weights = F.dropout(weights, p=self.attn.dropout, training=self.training)
        return merge_heads(self.attn, weights @ v)


class PairHeadMLP(nn.Module):
    """Official ``PairwiseDiffBlockV2``: LN, 3 x (Linear, LN, ReLU), Linear -> 1 logit."""

    def __init__(self, dim: int, norm_layer: Callable):
        super().__init__()
        layers = [norm_layer(dim)]
        for _ in range(3):
            layers += [nn.Linear(dim, dim), norm_layer(dim), nn.ReLU()]
        self.pre_linear_block = nn.Sequential(*layers)
        self.output_head = nn.Linear(dim, 1)
        for index in (1, 4, 7):
            nn.init.xavier_normal_(self.pre_linear_block[index].weight)
        nn.init.xavier_normal_(self.output_head.weight)

    def forward(self, x):
        return self.output_head(self.pre_linear_block(x))


class ScoreMLP(nn.Module):
    """Official ``MLPLayer``: 2 x (Linear, LN, ReLU), Linear -> 1 score."""

    def __init__(self, dim: int, norm_layer: Callable):
        super().__init__()
        layers = []
        for _ in range(2):
            layers += [nn.Linear(dim, dim), norm_layer(dim), nn.ReLU()]
        self.pre_linear_block = nn.Sequential(*layers)
        self.output_head = nn.Linear(dim, 1)
        for index in (0, 3):
            nn.init.xavier_normal_(self.pre_linear_block[index].weight)
        nn.init.xavier_normal_(self.output_head.weight)

    def forward(self, x):
        return self.output_head(self.pre_linear_block(x))


class RankAdapter(nn.Module):
    """Text-conditioned fusion of image tokens, then a regression head and a relational pair head."""

    def __init__(self, cfg: AdapterCfg, act_layer: Callable = nn.GELU, norm_layer: Callable = LayerNorm):
        super().__init__()
        d = cfg.d_model
        if cfg.num_learnable_text_tokens > 0:
            # scalars, each broadcast over the width and prepended to the text tokens
            self.learnable_text_tokens = nn.Parameter(
                cfg.num_learnable_text_tokens ** -0.5 * torch.randn(1, cfg.num_learnable_text_tokens))
        else:
            self.learnable_text_tokens = None
        self.crossmodal_block = CrossModalFusion(
            d, cfg.num_layers, cfg.fusion_heads, act_layer=act_layer, norm_layer=norm_layer, output_dim=d)
        if cfg.reg_token_method == 'null':
            self.post_fuse_block = nn.Identity()
        else:
            layer = PostFuseLayer(d_model=d, nhead=cfg.n_head, dim_feedforward=d, dropout=0.1, batch_first=True)
            self.post_fuse_block = PostFuseEncoder(layer, num_layers=cfg.num_layers, enable_nested_tensor=False)
        self.pooler = cfg.adapter_attention_pooler
        self.reg_tokens = None
        if self.pooler == 'rank-attn':
            self.reg_tokens = nn.Parameter(d ** -0.5 * torch.randn(cfg.n_reg_tokens, d))
            self.reg_token_pooler = RankAwarePairAttention(d, cfg.pair_heads, norm_layer)
        elif self.pooler in PER_IMAGE_POOLERS and cfg.n_reg_tokens > 0:
            self.reg_token_pooler = AttentionalPooler(d, cfg.n_reg_tokens, self.pooler)
        else:  # 'null', or no queries: no attention parameters (as the original's state dict)
            self.reg_token_pooler = nn.Identity()
        self.pair_regressor = PairHeadMLP(d, norm_layer)
        self.reg_ln = norm_layer(d)
        self.regressor = ScoreMLP(d, norm_layer)
        if not self.has_pair_head:
            # The original's per-image branch feeds pair_regressor one pooled feature per image ([N, 1], no pairs;
            # only its single-head loss trains it) and skips reg_ln: both stay in the state dict, frozen, since
            # no rank output depends on them.
            self.pair_regressor.requires_grad_(False)
            self.reg_ln.requires_grad_(False)

    @property
    def has_pair_head(self) -> bool:
        """Whether the pair head compares image pairs ('rank-attn', 'null'); the per-image poolers have none."""
        return self.pooler not in PER_IMAGE_POOLERS

    def _require_pair_head(self):
        if not self.has_pair_head:
            raise ValueError(
                f"adapter_attention_pooler={self.pooler!r} has no pair head (the original's branch gives it one "
                f"feature per image, [N, 1], not pairs): train with --loss-opt single-head, rank without --pairwise.")

    def set_grad_checkpointing(self, enable: bool = True):
        """``--grad-checkpointing``: the fusion blocks and the post-fusion encoder layers recompute in backward."""
        self.crossmodal_block.grad_checkpointing = enable
        if isinstance(self.post_fuse_block, PostFuseEncoder):
            self.post_fuse_block.grad_checkpointing = enable

    def fuse(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor,
             text_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """[N, P, D] image tokens conditioned on text tokens -> [N, P, D]. ``text_tokens`` is [N, T, D] (one text
        per image), [1, T, D] (one for all) or [U, T, D] distinct texts with ``text_index`` [N] naming each
        image's: the text side of the fusion runs once per distinct text."""
        if self.learnable_text_tokens is not None:
            rows, _, width = text_tokens.shape
            prefix = self.learnable_text_tokens.to(text_tokens.dtype).view(1, -1, 1).expand(rows, -1, width)
            text_tokens = torch.cat([prefix, text_tokens], dim=1)
        x = self.crossmodal_block(image_tokens, text_tokens, text_index)
        return self.post_fuse_block(x)

    def scores(self, fused: torch.Tensor) -> torch.Tensor:
        if not self.has_pair_head:  # the original: regressor(sum over queries of pooler(x)), no reg_ln
            return self.regressor(self.reg_token_pooler(fused).sum(dim=1)).squeeze(-1)
        return self.regressor(self.reg_ln(fused).sum(dim=1)).squeeze(-1)

    def pair_logits(self, fused: torch.Tensor) -> torch.Tensor:
        """[N, N] logits; entry (i, j) > 0 means image i ranks above image j."""
        summaries = self.pair_summaries(fused)
        return self.pair_logits_between(summaries, summaries)

    def pair_summaries(self, fused: torch.Tensor):
        """Per-image statistics of the pair head: (o, L) of ``RankAwarePairAttention``, or for the 'null' pooler the
        token mean m (the original's mean over tokens of x_i - x_j is m_i - m_j)."""
        self._require_pair_head()
        if self.pooler == 'null':
            return (fused.mean(dim=1),)
        return self.reg_token_pooler.per_image_summaries(self.reg_tokens.to(fused.dtype), fused)

    def pair_logits_between(self, summaries_i, summaries_j) -> torch.Tensor:
        """[I, J] logits for every pair of two sets of summaries: a block of ``pair_logits``."""
        if self.pooler == 'null':
            (mean_i,), (mean_j,) = summaries_i, summaries_j
            return self.pair_regressor(mean_i.unsqueeze(1) - mean_j.unsqueeze(0)).squeeze(-1)
        (values_i, log_norm_i), (values_j, log_norm_j) = summaries_i, summaries_j
        pair = self.reg_token_pooler.pair_features(values_i, log_norm_i, values_j, log_norm_j, self.reg_tokens.shape[0])
        return self.pair_regressor(pair).squeeze(-1)

    def forward(self, image_tokens, text_tokens, with_pairs: bool = True, text_index: Optional[torch.Tensor] = None):
        fused = self.fuse(image_tokens, text_tokens, text_index)
        pair_logits = self.pair_logits(fused) if with_pairs and self.has_pair_head else None
        return self.scores(fused), pair_logits
