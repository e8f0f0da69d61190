"""The one seam through which every matrix of a decoder layer is built and loaded.

Architecture files never create weight matrices themselves: they ask a ``LinearFactory``
for a ``LinearLike`` (one matrix, possibly the fusion of several checkpoint tensors) or a
``GroupedLinearLike`` (one matrix per expert of a mixture-of-experts layer). The default
factory builds dense float layers; another factory (quantized kernels, another device)
plugs in by implementing the same two protocols, without touching any architecture.

Blocks say which matrices split across tensor-parallel ranks by output rows (``column``:
q/k/v, gate/up) or input columns (``row``: o, down), naming the segments (heads, rows)
of the fused matrix; with one rank these are plain ``linear`` matrices
(molink.models.parallel.factory builds the split ones).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from molink.errors import WeightLoadError
from molink.models.cpu_linear import add_linear, linear, prepack, serves_every_batch, unpack
from molink.models.parallel.group import SINGLE, ParallelGroup
from molink.models.parallel.shard import Segment

_ROW_BLOCK = 64  # rows per step of a transposing copy: keeps both sides in cache


@runtime_checkable
class LinearLike(Protocol):
    """``y = x @ W.T (+ b)`` for x [T, in_features]."""

    in_features: int
    out_features: int

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``residual + self(x)``, fused where the kernel allows."""
        ...

    def load_weight(self, weight: torch.Tensor, pack: bool) -> None:
        """Take a row-major [out_features, in_features] checkpoint matrix."""
        ...

    def prepack(self, enable: bool) -> None: ...


@runtime_checkable
class TableLike(LinearLike, Protocol):
    """A vocabulary-sized matrix that is both the input embedding and (tied) the LM head."""

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of the matrix, [len(ids), in_features]."""
        ...


@runtime_checkable
class GroupedLinearLike(Protocol):
    """One [out, in] matrix per expert; ``forward_expert`` runs the rows routed to one."""

    num_experts: int
    in_features: int
    out_features: int

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor: ...

    def load_weight(self, weight: torch.Tensor, pack: bool) -> None:
        """Take [num_experts, out_features, in_features]."""
        ...


@dataclass(frozen=True)
class LinearFactory:
    """Builds the matrices of a slice with one dtype and device."""

    dtype: torch.dtype
    device: torch.device

    def linear(self, in_features: int, out_features: int, bias: bool = False) -> LinearLike:
        return DenseLinear(in_features, out_features, bias, self.dtype, self.device)

    def grouped(
        self, num_experts: int, in_features: int, out_features: int, bias: bool = False
    ) -> GroupedLinearLike:
        return DenseGroupedLinear(
            num_experts, in_features, out_features, bias, self.dtype, self.device
        )

    def table(self, rows: int, cols: int) -> TableLike | None:
        """The embedding / LM head matrix; None: a plain float matrix of the slice."""
        return None

    @property
    def group(self) -> ParallelGroup:
        """The tensor-parallel ranks the matrices are split across (one: not split)."""
        return SINGLE

    def column(
        self, in_features: int, segments: Sequence[Segment], bias: bool = False
    ) -> LinearLike:
        """A matrix whose output rows (``segments``, fused) split across ranks."""
        return self.linear(in_features, sum(s.size for s in segments), bias)

    def row(self, segments: Sequence[Segment], out_features: int, bias: bool = False) -> LinearLike:
        """A matrix whose input columns split across ranks; its output is the full sum."""
        return self.linear(sum(s.size for s in segments), out_features, bias)

    def grouped_column(
        self, num_experts: int, in_features: int, segments: Sequence[Segment], bias: bool = False
    ) -> GroupedLinearLike:
        return self.grouped(num_experts, in_features, sum(s.size for s in segments), bias)

    def grouped_row(
        self, num_experts: int, segments: Sequence[Segment], out_features: int, bias: bool = False
    ) -> GroupedLinearLike:
        """Experts' input columns split across ranks: outputs are partial sums, which the
        caller adds up across ranks (``group.all_reduce``) once for all experts."""
        return self.grouped(num_experts, sum(s.size for s in segments), out_features, bias)

    def vocab_table(self, rows: int, cols: int) -> TableLike | None:
        """The embedding / LM head, whose vocabulary rows split across ranks."""
        return self.table(rows, cols)

    def vector(self, size: int) -> nn.Parameter:
        return nn.Parameter(torch.empty(size, dtype=self.dtype, device=self.device), False)


def matrix_param(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    """A [rows, cols] weight stored column-major (a transposed view of [cols, rows]).

    ``F.linear(x, w)`` computes ``x @ w.T``; with this layout ``w.T`` is contiguous, which
    MKL runs faster for few rows: about 15% for batch-1 decode and twice as fast for the
    LM head at 8 rows. (2-32 rows use oneDNN-packed copies where available; see cpu_linear.)
    """
    storage = torch.empty((cols, rows), dtype=dtype, device=device)
    return nn.Parameter(storage.t(), requires_grad=False)


def check_matrix_shape(source: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(source.shape) != shape:
        raise WeightLoadError(f"tensor {what!r} has shape {tuple(source.shape)}, expected {shape}")


def copy_matrix(target: torch.Tensor, source: torch.Tensor, what: str) -> None:
    """Copy a row-major [out, in] tensor into ``target``, whatever its layout."""
    check_matrix_shape(source, tuple(target.shape), what)
    source = source.to(device=target.device, dtype=target.dtype)
    if target.device.type != "cpu" or target.stride() == source.stride():
        target.copy_(source)
        return
    # A plain copy_ into a transposed view walks memory with a large stride on one side;
    # copying a band of rows at a time is several times faster.
    for row in range(0, source.shape[0], _ROW_BLOCK):
        target[row : row + _ROW_BLOCK].copy_(source[row : row + _ROW_BLOCK])


class DenseLinear(nn.Module):
    """A float matrix (column-major) with an optional oneDNN-packed copy for small batches.

    A bfloat16 packed copy serves every batch (molink.models.cpu_linear), so the layer then
    keeps only that copy: ``weight`` is empty until something needs the plain matrix again
    (``.to()``, ``prepack(False)``), which gets it back exactly from the packed copy.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = matrix_param(out_features, in_features, dtype, device)
        self.bias = (
            nn.Parameter(torch.empty(out_features, dtype=dtype, device=device), False)
            if bias
            else None
        )
        self.packed: torch.Tensor | None = None  # not in state_dict

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.packed, self.bias)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return add_linear(residual, x, self.weight, self.packed, self.bias)

    def load_weight(self, weight: torch.Tensor, pack: bool) -> None:
        shape = (self.out_features, self.in_features)
        what = f"[{self.out_features}, {self.in_features}] matrix"
        check_matrix_shape(weight, shape, what)
        # Packing from the row-major source avoids re-reading the transposed copy.
        packed = prepack(weight.to(self.weight.dtype)) if pack else None
        if serves_every_batch(packed):
            self._drop_plain()  # never written: its pages are never touched
        else:
            if self._plain_dropped():
                self.weight = matrix_param(*shape, self.weight.dtype, self.weight.device)
            copy_matrix(self.weight, weight, what)
        self.packed = packed

    def prepack(self, enable: bool) -> None:
        self._restore_plain()
        self.packed = prepack(self.weight) if enable else None
        if serves_every_batch(self.packed):
            self._drop_plain()

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self._restore_plain()  # what .to()/.half() convert is the plain matrix
        self.packed = None  # a packed copy would be stale after .to()/.half()
        return super()._apply(fn, recurse)

    def _plain_dropped(self) -> bool:
        return self.weight.numel() == 0 < self.in_features * self.out_features

    def _drop_plain(self) -> None:
        self.weight = nn.Parameter(self.weight.new_empty(0), requires_grad=False)

    def _restore_plain(self) -> None:
        if self._plain_dropped():
            assert self.packed is not None  # the plain matrix is dropped only beside it
            plain_t = unpack(self.packed, self.in_features)  # [in, out]: column-major W
            self.weight = nn.Parameter(plain_t.t(), requires_grad=False)


class DenseGroupedLinear(nn.Module):
    """Experts' matrices as one [E, out, in] tensor (row-major: each expert contiguous)."""

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.in_features = in_features
        self.out_features = out_features
        shape = (num_experts, out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device=device), False)
        self.bias = (
            nn.Parameter(torch.empty(num_experts, out_features, dtype=dtype, device=device), False)
            if bias
            else None
        )

    def forward_expert(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias[expert]
        return F.linear(x, self.weight[expert], bias)

    def load_weight(self, weight: torch.Tensor, pack: bool) -> None:
        if tuple(weight.shape) != tuple(self.weight.shape):
            raise WeightLoadError(
                f"experts' tensor has shape {tuple(weight.shape)}, "
                f"expected {tuple(self.weight.shape)}"
            )
        self.weight.copy_(weight)
