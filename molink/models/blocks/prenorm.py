"""The pre-norm decoder layer most families use: ``x += attn(norm(x)); x += mlp(norm(x))``."""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from molink.models.blocks.attention import SelfAttention
from molink.models.blocks.direct_decode import DirectPreNorm
from molink.models.forward_context import ForwardContext


class FeedForward(Protocol):
    """A dense MLP or a mixture of experts."""

    def __call__(self, h: torch.Tensor) -> torch.Tensor: ...

    def add_to(self, residual: torch.Tensor, h: torch.Tensor) -> torch.Tensor: ...


class PreNormLayer(nn.Module):
    """``residual_multiplier`` scales both branches before they join the stream (Granite)."""

    def __init__(
        self,
        attn: SelfAttention,
        mlp: nn.Module,
        input_norm: nn.Module,
        post_norm: nn.Module,
        residual_multiplier: float | None = None,
    ) -> None:
        super().__init__()
        self.input_norm = input_norm
        self.attn = attn
        self.post_norm = post_norm
        self.mlp = mlp
        self.residual_multiplier = residual_multiplier
        # The same forward without module dispatch, where the parts allow it (its module).
        self.direct = DirectPreNorm.of(self)

    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        direct = self.direct
        if direct is not None:
            out = direct.forward(x, ctx, key_cache, value_cache)
            if out is not None:
                return out
        # forward() directly, as the decoder calls its layers (molink/models/decoder.py):
        # no hooks are registered on blocks, and a decode step makes ~150 such calls.
        attn = self.attn
        heads = attn.forward(self.input_norm.forward(x), ctx, key_cache, value_cache)
        mlp: FeedForward = self.mlp  # type: ignore[assignment]
        scale = self.residual_multiplier
        if scale is None:
            x = attn.o.add_to(x, heads)
            return mlp.add_to(x, self.post_norm.forward(x))
        x = x + attn.o(heads) * scale
        return x + mlp(self.post_norm.forward(x)) * scale
