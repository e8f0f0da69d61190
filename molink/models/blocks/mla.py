"""Multi-head latent attention (DeepSeek-V2/V3) over a cache of compressed latents.

Per token the cache holds ONE vector: the normalised KV latent (``kv_lora_rank``) followed
by the rotated shared rope key (``qk_rope_head_dim``); values are the latent part of the
same vector. The per-head up-projection of keys is absorbed into the query
(``q_nope @ W_uk`` lands in latent space) and that of values is applied after attention
(``out @ W_uv``), so attention runs as multi-query attention on the latents and the cache
is ``kv_lora_rank + rope`` numbers per token and layer instead of
``heads * (qk_head_dim + v_head_dim)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from molink.models.attention import AttentionOptions, paged_attention
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.norms import RMSNorm
from molink.models.forward_context import ForwardContext


@dataclass(frozen=True)
class MLASpec:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None  # None: one q projection (DeepSeek-V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    norm_eps: float
    scale: float
    bias: bool = False  # attention_bias: on q_a, kv_a and o

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


class LatentAttention(nn.Module):
    def __init__(self, spec: MLASpec, factory: LinearFactory) -> None:
        super().__init__()
        self.spec = spec
        dtype, device = factory.dtype, factory.device
        heads, hidden = spec.num_heads, spec.hidden_size
        q_out = heads * spec.qk_head_dim
        self.q: nn.Module | None = None
        self.q_a: nn.Module | None = None
        if spec.q_lora_rank is None:
            self.q = factory.linear(hidden, q_out)
        else:
            self.q_a = factory.linear(hidden, spec.q_lora_rank, spec.bias)
            self.q_a_norm = RMSNorm(spec.q_lora_rank, spec.norm_eps, dtype, device)
            self.q_b = factory.linear(spec.q_lora_rank, q_out)
        self.kv_a = factory.linear(hidden, spec.kv_lora_rank + spec.qk_rope_head_dim, spec.bias)
        self.kv_a_norm = RMSNorm(spec.kv_lora_rank, spec.norm_eps, dtype, device)
        # Per-head halves of kv_b_proj, used as batched matmuls (absorbed, see above).
        lora = spec.kv_lora_rank
        self.w_uk = nn.Parameter(
            torch.empty(heads, spec.qk_nope_head_dim, lora, dtype=dtype, device=device), False
        )
        self.w_uv = nn.Parameter(
            torch.empty(heads, spec.v_head_dim, lora, dtype=dtype, device=device), False
        )
        self.o = factory.linear(heads * spec.v_head_dim, hidden, spec.bias)

    def _query(self, h: torch.Tensor) -> torch.Tensor:
        if self.q is not None:
            q = self.q(h)
        else:
            q = self.q_b(self.q_a_norm(self.q_a(h)))
        return q.view(h.shape[0], self.spec.num_heads, self.spec.qk_head_dim)

    def forward(
        self,
        h: torch.Tensor,
        ctx: ForwardContext,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        """[T, hidden] -> the heads' output [T, heads * v_head_dim] (before ``o``)."""
        spec = self.spec
        num_tokens, lora = h.shape[0], spec.kv_lora_rank
        q = self._query(h)
        q_nope, q_pe = q[..., : spec.qk_nope_head_dim], q[..., spec.qk_nope_head_dim :]
        kv = self.kv_a(h)
        latent = self.kv_a_norm(kv[:, :lora]).view(num_tokens, 1, lora)
        k_pe = ctx.rotate("default", kv[:, lora:].reshape(num_tokens, 1, -1))
        q_pe = ctx.rotate("default", q_pe)
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)
        query = torch.cat((q_latent, q_pe), dim=-1)
        key = torch.cat((latent, k_pe), dim=-1)
        options = AttentionOptions(scale=spec.scale)
        meta = ctx.attention_meta(None)
        out = paged_attention(query, key, key[..., :lora], key_cache, value_cache, meta, options)
        out = out.view(num_tokens, spec.num_heads, lora).transpose(0, 1)
        heads = torch.bmm(out, self.w_uv.transpose(1, 2)).transpose(0, 1)
        return heads.reshape(num_tokens, spec.num_heads * spec.v_head_dim)
