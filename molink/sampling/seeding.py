"""Stateless per-request randomness.

A seeded sequence draws one uniform number per step, computed from ``(seed, step)`` alone
with a counter-based hash (SplitMix64). Nothing is carried between steps, so the draw is
the same whatever else is in the batch, after preemption, and when the sequence is replayed
on another node — and it does not depend on the Python or torch version or on the device.
"""

from __future__ import annotations

_MASK64 = (1 << 64) - 1
_GOLDEN_GAMMA = 0x9E3779B97F4A7C15
_MIX_1 = 0xBF58476D1CE4E5B9
_MIX_2 = 0x94D049BB133111EB
_TWO_POW_MINUS_53 = 2.0**-53


def _splitmix64(value: int) -> int:
    z = (value + _GOLDEN_GAMMA) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX_1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX_2) & _MASK64
    return z ^ (z >> 31)


def seeded_uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) determined only by ``seed`` and ``step``."""
    mixed = _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return (mixed >> 11) * _TWO_POW_MINUS_53
