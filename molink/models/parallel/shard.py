"""Which rows or columns of a checkpoint matrix each tensor-parallel rank holds.

A fused matrix (q/k/v, gate/up) is a sequence of *segments* along one dimension, each a
number of equal units (attention heads of ``head_dim`` rows, or single rows). A rank takes
its share of every segment; a segment of fewer units than ranks (the KV heads of a model
with grouped-query attention and few KV heads) is replicated, each rank taking the one
unit that its query heads read, as vLLM does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from molink.errors import InvalidParameterError

Range = tuple[int, int]


@dataclass(frozen=True)
class Segment:
    """``units`` consecutive units of ``unit_size`` rows (or columns); ``what`` names them."""

    units: int
    unit_size: int = 1
    what: str = "rows"

    @property
    def size(self) -> int:
        return self.units * self.unit_size


def local_units(units: int, size: int, rank: int, what: str) -> Range:
    """The units [start, stop) of ``rank``: an equal share, or one replicated unit."""
    if units % size == 0:
        share = units // size
        return rank * share, (rank + 1) * share
    if size % units == 0:
        unit = rank // (size // units)
        return unit, unit + 1
    raise InvalidParameterError(
        "tensor_parallel_size",
        f"{size} does not divide the model's {units} {what} (and is not a multiple of it)",
    )


def split_units(units: int, size: int, what: str) -> int:
    """Units per rank of a segment that must split evenly (query heads, MLP rows)."""
    if units % size:
        raise InvalidParameterError(
            "tensor_parallel_size", f"{size} does not divide the model's {units} {what}"
        )
    return units // size


@dataclass(frozen=True)
class ShardRule:
    """Rank-local ranges of a fused tensor along ``dim`` (0: rows, 1: columns).

    ``total`` is the fused length. A binding's checkpoint parts along dim 0 follow each
    other (q, k, v; or gate_0, up_0, gate_1, ... of stacked experts: the offset wraps at
    ``total``); along dim 1 every part spans the whole length.
    """

    dim: int
    total: int
    ranges: tuple[Range, ...]

    @property
    def local_size(self) -> int:
        return sum(stop - start for start, stop in self.ranges)

    def pieces(self, offset: int, length: int) -> list[Range]:
        """This rank's ranges inside the part at ``[offset, offset + length)``, relative to it."""
        out = []
        for start, stop in self.ranges:
            lo, hi = max(start, offset), min(stop, offset + length)
            if lo < hi:
                out.append((lo - offset, hi - offset))
        return out


def segment_rule(dim: int, segments: Sequence[Segment], size: int, rank: int) -> ShardRule:
    ranges: list[Range] = []
    offset = 0
    for segment in segments:
        first, last = local_units(segment.units, size, rank, segment.what)
        ranges.append((offset + first * segment.unit_size, offset + last * segment.unit_size))
        offset += segment.size
    return ShardRule(dim, offset, tuple(ranges))


def vocab_rule(vocab_size: int, size: int, rank: int) -> ShardRule:
    """Rows of an embedding / LM head: ceil(vocab / size) per rank, the last one shorter."""
    per_rank = -(-vocab_size // size)
    start = min(rank * per_rank, vocab_size)
    return ShardRule(0, vocab_size, ((start, min(start + per_rank, vocab_size)),))


@runtime_checkable
class Sharded(Protocol):
    """A module some of whose tensors hold only this rank's share of the checkpoint's."""

    def shard_rule(self, attr: str) -> ShardRule | None:
        """How this rank's ``attr`` (``weight``, ``bias``, ...) is cut; None: whole."""
        ...
