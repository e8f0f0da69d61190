"""Rotary position embeddings: inverse frequencies (with scaling) and cached cos/sin tables.

The tables are computed once per model in float32, exactly as transformers computes them
(``position * inv_freq`` then cos/sin), so positions embed identically.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from molink.config import ModelConfig
from molink.errors import InvalidParameterError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    """Old configs say ``type``, newer ones ``rope_type``; no scaling means default."""
    if not scaling:
        return "default"
    return str(scaling.get("rope_type") or scaling.get("type") or "default")


def base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    old_context_len = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are divided by factor, short ones kept, the band between is blended.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(
    theta: float, dim: int, scaling: dict[str, Any], max_positions: int
) -> tuple[torch.Tensor, float]:
    original = int(scaling.get("original_max_position_embeddings") or max_positions)
    factor = scaling.get("factor") or max_positions / original
    factor = float(factor)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = float(scaling.get("beta_fast") or 32)
    beta_slow = float(scaling.get("beta_slow") or 1)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    extrapolation_factor = 1 - ramp
    inv_freq = interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
    return inv_freq, float(attention_factor)


def compute_inv_freq(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (float32) and the factor cos/sin are scaled by."""
    scaling = config.rope_scaling
    rope_type = rope_type_of(scaling)
    dim = config.head_dim
    if rope_type == "default":
        return base_inv_freq(config.rope_theta, dim), 1.0
    assert scaling is not None
    if rope_type == "linear":
        return base_inv_freq(config.rope_theta, dim) / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        return llama3_inv_freq(base_inv_freq(config.rope_theta, dim), scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(config.rope_theta, dim, scaling, config.max_position_embeddings)
    raise InvalidParameterError(
        "rope_scaling",
        f"rope type {rope_type!r} is not supported; supported: {', '.join(SUPPORTED_ROPE_TYPES)}",
    )


class RotaryTables:
    """cos and sign-folded sin for every position up to ``max_position_embeddings``.

    ``sin_signed`` is ``[-sin, sin]`` over the two halves of a head, so that
    ``rotate_half(x) * sin == roll(x, head_dim // 2) * sin_signed``: one ``roll`` replaces
    transformers' slice/neg/cat while giving bit-identical results.
    """

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device: torch.device) -> None:
        inv_freq, attention_scaling = compute_inv_freq(config)
        positions = torch.arange(config.max_position_embeddings, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * attention_scaling
        sin = emb.sin() * attention_scaling
        half = config.head_dim // 2
        sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        self.cos = cos.to(device=device, dtype=dtype)
        self.sin_signed = sin_signed.to(device=device, dtype=dtype)
        self.half = half

    def lookup(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for ``positions`` [T], shaped [T, 1, head_dim] to span heads."""
        return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)


def apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor, half: int
) -> torch.Tensor:
    """Rotate ``x`` [T, heads, head_dim] by the per-token angles."""
    return torch.addcmul(x * cos, torch.roll(x, shifts=half, dims=-1), sin_signed)
