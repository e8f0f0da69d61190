"""What every layer of one forward shares: attention metadata per window, rotary angles."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from molink.models.attention_metadata import AttentionMetadata
from molink.models.rope import RotaryTables


class ForwardContext:
    """Built once per forward by the decoder slice; layers ask it for what they need.

    Metadata for a sliding window and cos/sin for a rotary variant are computed on first
    request and then reused by every later layer of the same kind.
    """

    def __init__(self, meta: AttentionMetadata, rotaries: Mapping[str, RotaryTables]) -> None:
        self.meta = meta
        self._rotaries = rotaries
        self._windowed: dict[int, AttentionMetadata] = {}
        self._angles: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def attention_meta(self, window: int | None) -> AttentionMetadata:
        """The batch's metadata with every token limited to the last ``window`` positions."""
        if window is None or self.meta.max_context_len <= window:
            return self.meta
        meta = self._windowed.get(window)
        if meta is None:
            meta = self.meta.with_sliding_window(window)
            self._windowed[window] = meta
        return meta

    def rotate(self, key: str, x: torch.Tensor) -> torch.Tensor:
        """``x`` [T, heads, head_dim] rotated by the positions of the batch (variant ``key``)."""
        tables = self._rotaries[key]
        angles = self._angles.get(key)
        if angles is None:
            lengths = self._sequence_lengths() if tables.depends_on_length else None
            angles = tables.lookup(self.meta.positions, lengths)
            self._angles[key] = angles
        return tables.apply(x, *angles)

    def rotate_qk(
        self, key: str, qk: torch.Tensor, num_heads: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated in one pass: ``qk`` [T, heads + kv_heads, head_dim] holds q's
        heads then k's (the fused projection's rows). Every head goes through the same
        elementwise ops as when q and k are rotated apart, so the values are the same;
        one pass saves a rotation's calls per layer. Returns views [T, heads, head_dim]
        and [T, kv_heads, head_dim] of one tensor."""
        both = self.rotate(key, qk)
        return both[:, :num_heads], both[:, num_heads:]

    def _sequence_lengths(self) -> torch.Tensor:
        """Per token, its sequence's length as of this forward (the end of its chunk)."""
        ends = [c.start_pos + c.num_tokens for c in self.meta.chunks for _ in range(c.num_tokens)]
        return torch.tensor(ends, dtype=torch.long, device=self.meta.positions.device)
