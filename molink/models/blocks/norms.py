"""Normalisation layers: RMSNorm and LayerNorm (with or without bias).

Gemma's ``(1 + w)`` RMSNorm is an RMSNorm whose weight gets 1 added at load time (see the
Gemma architecture files): the forward pass is then the same kernel for every family.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.shape = (dim,)
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim, dtype=dtype, device=device), False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # torch's op itself: F.rms_norm only adds a __torch_function__ check before it.
        return torch.rms_norm(x, self.shape, self.weight, self.eps)


class LayerNorm(nn.Module):
    """LayerNorm over the last ``len(shape)`` dimensions; Cohere's has no bias."""

    def __init__(
        self,
        shape: tuple[int, ...],
        eps: float,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.shape = shape
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), False)
        self.bias = (
            nn.Parameter(torch.empty(shape, dtype=dtype, device=device), False) if bias else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.shape, self.weight, self.bias, self.eps)


class HeadLayerNorm(nn.Module):
    """Bias-free LayerNorm over each head's channels, with a weight per head (Cohere's q/k)."""

    def __init__(
        self, num_heads: int, head_dim: int, eps: float, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.shape = (head_dim,)
        self.eps = eps
        self.weight = nn.Parameter(
            torch.empty(num_heads, head_dim, dtype=dtype, device=device), False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.shape, None, None, self.eps) * self.weight
