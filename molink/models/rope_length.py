"""Rotary variants that depend on how long the sequence is: dynamic NTK and longrope.

transformers rotates every token of a forward by the frequencies for that forward's
sequence length (``max(position_ids) + 1``): past the pre-training context, dynamic NTK
raises the base for that length and longrope switches from the short to the long factors.
With its KV cache, keys keep the rotation of the forward that computed them. MoLink does
the same per sequence: a token is rotated for the end of its chunk (a whole prompt, or the
token itself when decoding), so a prompt prefilled in one chunk and decoded token by token
equals transformers' ``generate``. Where transformers' result depends on more than one
sequence it cannot be matched per request, and is not: transformers takes the longest
sequence of a padded batch for all of them, and a prompt split into several chunks (or
reusing cached blocks) keeps each chunk's rotation, as a continued transformers cache does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from molink.models.rope import (
    RopeSpec,
    angle_tables,
    longrope_inv_freq,
    longrope_settings,
    rope_type_of,
)

if TYPE_CHECKING:
    from molink.config import ModelConfig


def max_context(spec: RopeSpec) -> int:
    """The longest sequence the variant rotates, as vLLM derives its limit: dynamic NTK
    extends the context by its factor, YaRN reaches its pre-training context times its
    factor (Qwen's long-context recipe adds YaRN with factor 4 to a model whose
    max_position_embeddings stays 32k or 40k); every other variant stops at
    ``max_positions``."""
    rope_type, scaling = rope_type_of(spec.scaling), spec.scaling
    if rope_type == "dynamic" and scaling is not None:
        return int(spec.max_positions * float(scaling["factor"]))
    if rope_type == "yarn" and scaling is not None and scaling.get("factor"):
        original = scaling.get("original_max_position_embeddings") or spec.max_positions
        return max(spec.max_positions, int(int(original) * float(scaling["factor"])))
    return spec.max_positions


class LongContextAngles:
    """cos/sin for tokens of sequences longer than ``context`` (the pre-training length)."""

    context: int

    def angles(
        self, positions: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, dim] cos and signed sin for tokens at ``positions`` of sequences ``lengths``."""
        raise NotImplementedError


class LongRopeAngles(LongContextAngles):
    """Longrope's long factors, for every position of a sequence past the context."""

    def __init__(self, spec: RopeSpec, dtype: torch.dtype, device: torch.device) -> None:
        assert spec.scaling is not None
        self.context, attention_scaling = longrope_settings(spec, spec.scaling)
        inv_freq = longrope_inv_freq(spec, spec.scaling["long_factor"])
        freqs = torch.arange(spec.max_positions, dtype=torch.float32)[:, None] * inv_freq
        cos, sin_signed = angle_tables(freqs, attention_scaling, spec.interleaved)
        self._cos = cos.to(device=device, dtype=dtype)
        self._sin_signed = sin_signed.to(device=device, dtype=dtype)

    def angles(
        self, positions: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self._cos[positions], self._sin_signed[positions]


@dataclass
class DynamicNTKAngles(LongContextAngles):
    """Dynamic NTK: the base grows with the sequence length past the context, computed per
    token in float32 with transformers' formula (lengths are few per forward)."""

    context: int
    theta: float
    factor: float
    dim: int
    interleaved: bool
    dtype: torch.dtype

    def angles(
        self, positions: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        dim, factor = self.dim, self.factor
        length = torch.clamp(lengths.to(torch.int64), min=self.context)
        base = self.theta * ((factor * length / self.context) - (factor - 1)) ** (dim / (dim - 2))
        exponents = torch.arange(0, dim, 2, dtype=torch.int64, device=lengths.device).float() / dim
        inv_freq = 1.0 / (base.float()[:, None] ** exponents[None, :])
        freqs = positions.float()[:, None] * inv_freq
        cos, sin_signed = angle_tables(freqs, 1.0, self.interleaved)
        return cos.to(self.dtype), sin_signed.to(self.dtype)


def long_context_angles(
    spec: RopeSpec, dtype: torch.dtype, device: torch.device
) -> LongContextAngles | None:
    rope_type = rope_type_of(spec.scaling)
    if rope_type == "longrope":
        return LongRopeAngles(spec, dtype, device)
    if rope_type == "dynamic" and spec.scaling is not None:
        return DynamicNTKAngles(
            context=spec.max_positions,
            theta=spec.theta,
            factor=float(spec.scaling["factor"]),
            dim=spec.dim,
            interleaved=spec.interleaved,
            dtype=dtype,
        )
    return None


def model_max_context(config: ModelConfig) -> int:
    """The longest sequence every rotary table of ``config``'s layers can rotate."""
    from molink.models.registry import architecture_for

    specs = architecture_for(config).rope_specs(config).values()
    return min((max_context(spec) for spec in specs), default=config.max_position_embeddings)
