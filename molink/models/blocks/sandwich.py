"""Decoder layers whose branches are normalised on the way out as well as (or instead of)
on the way in: ``x += post(attn(pre(x))); x += post(mlp(pre(x)))``.

Gemma 2/3 and GLM-4 have all four norms; OLMo 2 only the two on the way out.
"""

from __future__ import annotations

import torch
from torch import nn

from molink.models.blocks.attention import SelfAttention
from molink.models.forward_context import ForwardContext


class SandwichLayer(nn.Module):
    def __init__(
        self,
        attn: SelfAttention,
        mlp: nn.Module,
        *,
        pre_attn_norm: nn.Module | None,
        post_attn_norm: nn.Module,
        pre_mlp_norm: nn.Module | None,
        post_mlp_norm: nn.Module,
    ) -> None:
        super().__init__()
        self.pre_attn_norm = pre_attn_norm
        self.attn = attn
        self.post_attn_norm = post_attn_norm
        self.pre_mlp_norm = pre_mlp_norm
        self.mlp = mlp
        self.post_mlp_norm = post_mlp_norm

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        # forward() directly: no hooks on blocks (see prenorm.py).
        pre_attn, pre_mlp = self.pre_attn_norm, self.pre_mlp_norm
        h = x if pre_attn is None else pre_attn.forward(x)
        attn = self.attn
        heads = attn.forward(h, ctx, key_cache, value_cache)
        x = x + self.post_attn_norm.forward(attn.o(heads))
        h = x if pre_mlp is None else pre_mlp.forward(x)
        return x + self.post_mlp_norm.forward(self.mlp.forward(h))
