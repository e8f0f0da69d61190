"""Rotary position embeddings: inverse frequencies (with scaling) and cached cos/sin tables.

The tables are computed once per model in float32, exactly as transformers computes them
(``position * inv_freq`` then cos/sin), so positions embed identically. Variants: scaling
types default, linear, llama3, yarn, dynamic (NTK) and longrope; rotation of the two halves
of a head (GPT-NeoX style) or of adjacent pairs (GPT-J style, ``interleaved``); and partial
rotation of the first ``rotary_dim`` dimensions of a head.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from molink.errors import InvalidParameterError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic", "longrope")


def rope_type_of(scaling: dict[str, Any] | None) -> str:
    """Old configs say ``type``, newer ones ``rope_type``; no scaling means default."""
    if not scaling:
        return "default"
    name = str(scaling.get("rope_type") or scaling.get("type") or "default")
    return "longrope" if name == "su" else name  # Phi-3's first configs said "su"


_PRETRAINED_CONTEXT_TYPES = ("llama3", "yarn", "longrope")


def standard_scaling(
    scaling: dict[str, Any] | None, config_original: int | None, max_positions: int
) -> dict[str, Any] | None:
    """The scaling with its pre-training context as transformers settles it for llama3, yarn
    and longrope: a config's own ``original_max_position_embeddings`` (Phi-3 keeps it
    outside the rope parameters) wins over the parameters', and ``max_positions`` stands in
    when neither says."""
    if rope_type_of(scaling) not in _PRETRAINED_CONTEXT_TYPES:
        return scaling
    assert scaling is not None
    original = config_original or scaling.get("original_max_position_embeddings")
    return {**scaling, "original_max_position_embeddings": int(original or max_positions)}


# What each scaling type cannot do without (yarn and longrope derive their factor).
_REQUIRED: dict[str, tuple[str, ...]] = {
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor"),
    "longrope": ("short_factor", "long_factor"),
}


@dataclass(frozen=True)
class RopeSpec:
    """Everything that decides the rotation of one kind of layer."""

    theta: float
    head_dim: int
    max_positions: int
    rotary_dim: int = 0  # 0: the whole head
    scaling: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    interleaved: bool = False  # rotate pairs (2i, 2i + 1) instead of halves
    original_max_positions: int | None = None  # longrope/dynamic: the pre-training context

    @property
    def dim(self) -> int:
        return self.rotary_dim or self.head_dim

    def check(self) -> None:
        rope_type = rope_type_of(self.scaling)
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise InvalidParameterError(
                "rope_scaling",
                f"rope type {rope_type!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}",
            )
        scaling = self.scaling or {}
        missing = [key for key in _REQUIRED.get(rope_type, ()) if scaling.get(key) is None]
        if missing:
            raise InvalidParameterError(
                "rope_scaling", f"{rope_type} scaling needs {', '.join(missing)}"
            )
        if rope_type == "longrope":
            for key in ("short_factor", "long_factor"):
                if len(scaling[key]) != self.dim // 2:
                    raise InvalidParameterError(
                        "rope_scaling",
                        f"longrope {key} has {len(scaling[key])} values; a rotated head of "
                        f"{self.dim} needs {self.dim // 2}",
                    )


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


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(spec: RopeSpec, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    theta, dim = spec.theta, spec.dim
    original = int(scaling.get("original_max_position_embeddings") or spec.max_positions)
    factor = float(scaling.get("factor") or spec.max_positions / original)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = yarn_mscale(factor)
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


def longrope_settings(spec: RopeSpec, scaling: dict[str, Any]) -> tuple[int, float]:
    """Phi-3's longrope: the pre-training context, and the cos/sin factor of both sets."""
    original = int(
        scaling.get("original_max_position_embeddings")
        or spec.original_max_positions
        or spec.max_positions
    )
    factor = float(scaling.get("factor") or spec.max_positions / original)
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        attention_factor = (
            1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        )
    return original, float(attention_factor)


def longrope_inv_freq(spec: RopeSpec, factors: list[float]) -> torch.Tensor:
    shape = torch.arange(0, spec.dim, 2, dtype=torch.int64).float() / spec.dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * spec.theta**shape)


def inv_freq_table(spec: RopeSpec) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] and the cos/sin factor (for dynamic and longrope: of
    sequences within the pre-training context)."""
    spec.check()
    scaling = spec.scaling
    rope_type = rope_type_of(scaling)
    dim = spec.dim
    if rope_type == "default":
        return base_inv_freq(spec.theta, dim), 1.0
    assert scaling is not None
    if rope_type == "linear":
        return base_inv_freq(spec.theta, dim) / float(scaling["factor"]), 1.0
    if rope_type == "llama3":
        return llama3_inv_freq(base_inv_freq(spec.theta, dim), scaling), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(spec, scaling)
    if rope_type == "dynamic":
        # Within the pre-training context dynamic NTK does not rescale; longer sequences
        # are rotated by molink.models.rope_length.
        return base_inv_freq(spec.theta, dim), 1.0
    # longrope: the short factors; sequences past the pre-training context, the long ones
    # (molink.models.rope_length).
    return longrope_inv_freq(spec, scaling["short_factor"]), longrope_settings(spec, scaling)[1]


def angle_tables(
    freqs: torch.Tensor, attention_scaling: float, interleaved: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sign-folded sin over a head's rotated dims, from angles [N, dim // 2]."""
    cos = freqs.cos() * attention_scaling
    sin = freqs.sin() * attention_scaling
    if interleaved:
        return cos.repeat_interleave(2, dim=-1), torch.stack((-sin, sin), dim=-1).flatten(-2)
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


class RotaryTables:
    """cos and sign-folded sin for every position a sequence may reach (rope_length.max_context).

    ``sin_signed`` folds the sign of the rotation into the table so that one ``roll``
    (halves) or one pair swap (interleaved) replaces transformers' slice/neg/cat while
    giving bit-identical results.

    Dynamic NTK and longrope rotate a sequence longer than the pre-training context
    differently (molink.models.rope_length): ``lookup`` then needs, per token, the length
    of its sequence as of the forward that computes it.
    """

    def __init__(self, spec: RopeSpec, dtype: torch.dtype, device: torch.device) -> None:
        from molink.models.rope_length import long_context_angles, max_context

        inv_freq, attention_scaling = inv_freq_table(spec)
        self.long_context = long_context_angles(spec, dtype, device)
        # Past max_positions, dynamic NTK's angles are computed per sequence length.
        rows = spec.max_positions if self.long_context is not None else max_context(spec)
        positions = torch.arange(rows, dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        cos, sin_signed = angle_tables(freqs, attention_scaling, spec.interleaved)
        self.cos = cos.to(device=device, dtype=dtype)
        self.sin_signed = sin_signed.to(device=device, dtype=dtype)
        self.dim = spec.dim
        self.partial = spec.dim != spec.head_dim
        self.interleaved = spec.interleaved

    @property
    def depends_on_length(self) -> bool:
        """Whether ``lookup`` needs each token's sequence length (dynamic, longrope)."""
        return self.long_context is not None

    def lookup(
        self, positions: torch.Tensor, lengths: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin for ``positions`` [T], shaped [T, 1, dim] to span heads.

        ``lengths`` [T]: each token's sequence length in this forward (the end of its
        chunk), needed when ``depends_on_length``.
        """
        long_context = self.long_context
        if long_context is None or lengths is None or positions.shape[0] == 0:
            return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)
        longer = lengths > long_context.context
        if not bool(longer.any()):
            return self.cos[positions].unsqueeze(1), self.sin_signed[positions].unsqueeze(1)
        cos, sin_signed = long_context.angles(positions, lengths)
        inside = ~longer[:, None]
        cos = torch.where(inside, self.cos[positions.clamp(max=self.cos.shape[0] - 1)], cos)
        sin_signed = torch.where(
            inside, self.sin_signed[positions.clamp(max=self.cos.shape[0] - 1)], sin_signed
        )
        return cos.unsqueeze(1), sin_signed.unsqueeze(1)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        """Rotate ``x`` [T, heads, head_dim] by the per-token angles."""
        if not self.partial:
            return self._rotate(x, cos, sin_signed)
        rotated = self._rotate(x[..., : self.dim], cos, sin_signed)
        return torch.cat((rotated, x[..., self.dim :]), dim=-1)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
        if self.interleaved:
            partner = x.unflatten(-1, (-1, 2)).flip(-1).flatten(-2)
        else:
            partner = torch.roll(x, shifts=self.dim // 2, dims=-1)
        return torch.addcmul(x * cos, partner, sin_signed)
