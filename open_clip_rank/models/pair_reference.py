"""The official pair-head algorithm, restated for verification (tests/test_pair_head.py) and benchmarks
(scripts/benchmark.py). Not used by the models: the reference the factorised form is checked against.

``quadratic_pair_attention`` computes what the official ``MultiHeadRankawareAttentionV2`` computes, the
way it computes it: the key/value tokens of every pair (i, j) concatenated into an
``[N*N, heads, 2P, d_head]`` tensor and one softmax over them. ``RankAwarePairAttention`` must
equal it (tests), and ``scripts/benchmark.py`` measures the two side by side.
"""
import torch
import torch.nn.functional as F


def quadratic_pair_attention(module, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """module: a ``RankAwarePairAttention`` (its weights); queries [Q, D], tokens [N, P, D] -> [N, N, D]."""
    n, p, d = tokens.shape
    h, dh = module.num_heads, module.d_head
    q = module.ln_q(module.q_proj(queries)).view(1, -1, h, dh).transpose(1, 2)  # [1, H, Q, dh]
    kv = module.ln_kv(module.kv_proj(tokens)).view(n, p, h, dh).transpose(1, 2)  # [N, H, P, dh]
    q = q.expand(n * n, -1, -1, -1)
    kv_pair = torch.cat([kv.repeat_interleave(n, dim=0), kv.repeat(n, 1, 1, 1)], dim=2)  # row i*N+j: [k_i; k_j]
    attn = F.softmax(torch.einsum('bhqd,bhpd->bhqp', q, kv_pair) * module.scale, dim=-1)
    values = (torch.einsum('bhqp,bhpd->bhqd', attn[..., :p], kv_pair[:, :, :p])
              - torch.einsum('bhqp,bhpd->bhqd', attn[..., p:], kv_pair[:, :, p:]))
    values = values.transpose(1, 2).reshape(n * n, -1, d)
    return module.out_proj(values).sum(dim=1).view(n, n, d)
