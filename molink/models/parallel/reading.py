"""Reading only a rank's share of checkpoint tensors.

A store that can slice on disk (safetensors' ``get_slice``: only the requested bytes are
read) implements ``SliceReader``; any other mapping of tensors is sliced after reading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from molink.errors import WeightLoadError
from molink.models.parallel.shard import Range, ShardRule


@runtime_checkable
class SliceReader(Protocol):
    def tensor_shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor ``name`` without reading its data."""
        ...

    def read_ranges(self, name: str, dim: int, ranges: Sequence[Range]) -> torch.Tensor:
        """Tensor ``name``'s ``ranges`` along ``dim`` (0 or 1), concatenated."""
        ...


def narrow_ranges(tensor: torch.Tensor, dim: int, ranges: Sequence[Range]) -> torch.Tensor:
    pieces = [tensor.narrow(dim, start, stop - start) for start, stop in ranges]
    if len(pieces) == 1:
        return pieces[0].contiguous()
    if not pieces:
        shape = list(tensor.shape)
        shape[dim] = 0
        return tensor.new_empty(shape)
    return torch.cat(pieces, dim=dim)


def _shape(tensors: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    if name not in tensors:
        raise WeightLoadError(f"checkpoint lacks tensor {name!r}")
    if isinstance(tensors, SliceReader):
        return tensors.tensor_shape(name)
    return tuple(tensors[name].shape)


def _read(
    tensors: Mapping[str, torch.Tensor], name: str, dim: int, ranges: Sequence[Range]
) -> torch.Tensor:
    if isinstance(tensors, SliceReader):
        return tensors.read_ranges(name, dim, ranges)
    return narrow_ranges(tensors[name], dim, ranges)


def read_shards(
    tensors: Mapping[str, torch.Tensor], names: Sequence[str], rule: ShardRule
) -> list[torch.Tensor]:
    """This rank's piece of each checkpoint part ``names`` of one binding (see ShardRule)."""
    parts = []
    offset = 0
    for name in names:
        shape = _shape(tensors, name)
        if rule.dim >= len(shape):
            raise WeightLoadError(f"tensor {name!r} of shape {shape} has no dimension {rule.dim}")
        length = shape[rule.dim]
        if rule.dim == 0:
            start = offset % rule.total
            offset += length
        else:
            start = 0
        if start + length > rule.total or (rule.dim != 0 and length != rule.total):
            raise WeightLoadError(
                f"tensor {name!r} of shape {shape} does not fit the {rule.total} "
                f"{'rows' if rule.dim == 0 else 'columns'} split across ranks"
            )
        parts.append(_read(tensors, name, rule.dim, rule.pieces(start, length)))
    return parts
