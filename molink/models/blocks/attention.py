"""Self-attention over the paged cache: fused q/k/v, optional q/k norms, rotary, output.

``AttentionSpec`` says what an architecture's attention looks like; ``SelfAttention``
returns the heads' output *before* the output projection ``o`` so that each layer decides
how that projection joins the residual stream (plain add, post-norm, a multiplier).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from molink.models.attention import AttentionOptions, paged_attention
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.norms import HeadLayerNorm, RMSNorm
from molink.models.forward_context import ForwardContext
from molink.models.parallel.group import ParallelGroup
from molink.models.parallel.norms import parallel_qk_norms
from molink.models.parallel.shard import Segment, ShardRule, local_units, segment_rule, split_units

QK_NORMS = (None, "head", "full", "head_layernorm")


@dataclass(frozen=True)
class AttentionSpec:
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    o_bias: bool = False
    # None; "head": RMSNorm over each head (Qwen3, Gemma 3); "full": RMSNorm over all heads
    # of q and of k (OLMo 2); "head_layernorm": LayerNorm per head, own weights (Cohere).
    qk_norm: str | None = None
    rope: str | None = "default"  # which of the slice's rotary tables; None: no rotation
    window: int | None = None  # sliding window of this layer
    scale: float | None = None
    softcap: float | None = None
    sinks: bool = False

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim


def head_segments(spec: AttentionSpec) -> tuple[Segment, Segment, Segment]:
    """q, k and v of the fused projection, in heads (the units ranks split by)."""
    return (
        Segment(spec.num_heads, spec.head_dim, "attention heads"),
        Segment(spec.num_kv_heads, spec.head_dim, "key/value heads"),
        Segment(spec.num_kv_heads, spec.head_dim, "key/value heads"),
    )


def rank_spec(spec: AttentionSpec, group: ParallelGroup) -> AttentionSpec:
    """The heads one tensor-parallel rank computes: an equal share of the query heads and
    of the KV heads, or (fewer KV heads than ranks) the one KV head its query heads read."""
    if not group.is_parallel:
        return spec
    heads = split_units(spec.num_heads, group.size, "attention heads")
    first, last = local_units(spec.num_kv_heads, group.size, group.rank, "key/value heads")
    return replace(spec, num_heads=heads, num_kv_heads=last - first)


class SelfAttention(nn.Module):
    def __init__(self, spec: AttentionSpec, factory: LinearFactory) -> None:
        super().__init__()
        assert spec.qk_norm in QK_NORMS, spec.qk_norm
        group = factory.group
        self.group = group
        self.full_spec = spec
        self.spec = rank_spec(spec, group)
        segments = head_segments(spec)
        self.qkv = factory.column(spec.hidden_size, segments, spec.qkv_bias)
        self.o = factory.row(segments[:1], spec.hidden_size, spec.o_bias)
        if group.is_parallel and spec.qk_norm in ("full", "head_layernorm"):
            self.q_norm, self.k_norm = parallel_qk_norms(
                spec.qk_norm,
                spec.num_heads,
                spec.num_kv_heads,
                spec.head_dim,
                spec.norm_eps,
                factory.dtype,
                factory.device,
                group,
            )
        else:
            self.q_norm, self.k_norm = _qk_norms(self.spec, factory)
        spec = self.spec
        self.sinks = factory.vector(spec.num_heads) if spec.sinks else None
        # Read by every decode step: sizes as plain ints, and the options made once where
        # they hold no tensor (sinks are a parameter, which loading may replace).
        self._q_end = spec.q_size
        self._k_end = spec.q_size + spec.kv_size
        self._plain_options = (
            None if spec.sinks else AttentionOptions(scale=spec.scale, softcap=spec.softcap)
        )

    def shard_rule(self, attr: str) -> ShardRule | None:
        """Sinks are per query head: each rank keeps its heads' (see molink.models.parallel)."""
        if attr != "sinks" or not self.group.is_parallel:
            return None
        heads = Segment(self.full_spec.num_heads, 1, "attention heads")
        return segment_rule(0, (heads,), self.group.size, self.group.rank)

    def options(self) -> AttentionOptions:
        if self._plain_options is not None:
            return self._plain_options
        spec = self.spec
        return AttentionOptions(scale=spec.scale, softcap=spec.softcap, sinks=self.sinks)

    def forward(
        self,
        h: torch.Tensor,
        ctx: ForwardContext,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        """[T, hidden] -> the heads' output [T, heads * head_dim] (before ``o``)."""
        spec = self.spec
        num_tokens = h.shape[0]
        qkv = self.qkv.forward(h)  # no hooks on blocks (see prenorm.py)
        q_end, k_end = self._q_end, self._k_end
        v = qkv[:, k_end:].view(num_tokens, spec.num_kv_heads, -1)
        if spec.rope is not None and spec.qk_norm is None:
            # q and k lie side by side in each row of qkv: one rotation covers both.
            qk = qkv[:, :k_end].view(num_tokens, -1, spec.head_dim)
            q, k = ctx.rotate_qk(spec.rope, qk, spec.num_heads)
        else:
            q, k = self._normed_qk(qkv[:, :q_end], qkv[:, q_end:k_end], num_tokens)
            if spec.rope is not None:
                q, k = ctx.rotate(spec.rope, q), ctx.rotate(spec.rope, k)
        meta = ctx.attention_meta(spec.window)
        return paged_attention(q, k, v, key_cache, value_cache, meta, self.options())

    def _normed_qk(
        self, q: torch.Tensor, k: torch.Tensor, num_tokens: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, head_dim] and k [T, kv_heads, head_dim], through the q/k norms."""
        spec = self.spec
        if spec.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(num_tokens, spec.num_heads, spec.head_dim)
        k = k.view(num_tokens, spec.num_kv_heads, spec.head_dim)
        if spec.qk_norm in ("head", "head_layernorm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return q, k


def _qk_norms(spec: AttentionSpec, factory: LinearFactory) -> tuple[nn.Module | None, ...]:
    dtype, device = factory.dtype, factory.device
    if spec.qk_norm == "head":
        return (
            RMSNorm(spec.head_dim, spec.norm_eps, dtype, device),
            RMSNorm(spec.head_dim, spec.norm_eps, dtype, device),
        )
    if spec.qk_norm == "full":
        return (
            RMSNorm(spec.q_size, spec.norm_eps, dtype, device),
            RMSNorm(spec.kv_size, spec.norm_eps, dtype, device),
        )
    if spec.qk_norm == "head_layernorm":
        return (
            HeadLayerNorm(spec.num_heads, spec.head_dim, spec.norm_eps, dtype, device),
            HeadLayerNorm(spec.num_kv_heads, spec.head_dim, spec.norm_eps, dtype, device),
        )
    return None, None
