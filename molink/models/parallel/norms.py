"""q/k norms of attention split by heads: per-head weights cut like the heads, and an
RMSNorm over all heads (OLMo 2) whose sum of squares is added up across ranks."""

from __future__ import annotations

import torch
from torch import nn

from molink.models.blocks.norms import HeadLayerNorm
from molink.models.parallel.group import ParallelGroup
from molink.models.parallel.shard import Segment, ShardRule, segment_rule


class ShardedHeadLayerNorm(HeadLayerNorm):
    """Cohere's per-head LayerNorm, with the weights of this rank's heads."""

    def __init__(
        self, rule: ShardRule, head_dim: int, eps: float, dtype: torch.dtype, device
    ) -> None:
        super().__init__(rule.local_size, head_dim, eps, dtype, device)
        self.rule = rule

    def shard_rule(self, attr: str) -> ShardRule | None:
        return self.rule if attr == "weight" else None


class ParallelRMSNorm(nn.Module):
    """RMSNorm over a vector whose channels are split across ranks. ``replicas``: how many
    ranks hold each channel (KV heads copied to several ranks count once)."""

    def __init__(
        self,
        rule: ShardRule,
        eps: float,
        dtype: torch.dtype,
        device,
        group: ParallelGroup,
        replicas: int = 1,
    ) -> None:
        super().__init__()
        self.rule = rule
        self.eps = eps
        self.group = group
        self.replicas = replicas
        self.weight = nn.Parameter(torch.empty(rule.local_size, dtype=dtype, device=device), False)

    def shard_rule(self, attr: str) -> ShardRule | None:
        return self.rule if attr == "weight" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        squares = x.float().square().sum(dim=-1, keepdim=True)
        if self.replicas > 1:
            squares = squares / self.replicas
        squares = self.group.all_reduce(squares)
        normed = x.float() * torch.rsqrt(squares / self.rule.total + self.eps)
        return normed.to(x.dtype) * self.weight


def parallel_qk_norms(
    kind: str,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    eps: float,
    dtype: torch.dtype,
    device,
    group: ParallelGroup,
) -> tuple[nn.Module, nn.Module]:
    """This rank's q and k norms of kind ``head_layernorm`` or ``full`` (full-model sizes)."""
    size, rank = group.size, group.rank
    if kind == "head_layernorm":
        q_rule = segment_rule(0, (Segment(num_heads, 1, "attention heads"),), size, rank)
        k_rule = segment_rule(0, (Segment(num_kv_heads, 1, "key/value heads"),), size, rank)
        return (
            ShardedHeadLayerNorm(q_rule, head_dim, eps, dtype, device),
            ShardedHeadLayerNorm(k_rule, head_dim, eps, dtype, device),
        )
    q_rule = segment_rule(0, (Segment(num_heads, head_dim, "attention heads"),), size, rank)
    k_rule = segment_rule(0, (Segment(num_kv_heads, head_dim, "key/value heads"),), size, rank)
    k_replicas = size // num_kv_heads if num_kv_heads < size else 1
    return (
        ParallelRMSNorm(q_rule, eps, dtype, device, group),
        ParallelRMSNorm(k_rule, eps, dtype, device, group, k_replicas),
    )
