"""Group-quantized matrices in one neutral form, before they are packed for a kernel.

Every weight format MoLink keeps quantized (GGUF's block types, AWQ, GPTQ, on-the-fly
int4/int8) is decoded into ``GroupInts``: small signed integers ``q`` [out, in] and, per
row and group of ``group`` consecutive inputs, a ``scale`` and an ``offset``, so that

    W[n, k] = scale[n, k // group] * q[n, k] + offset[n, k // group]

exactly (float32 scale and offset hold every GGUF/AWQ/GPTQ scale without rounding). The
kernel packing (molink.quant.int4) is where rounding may happen, and only there.

Act-order GPTQ groups inputs that are not neighbours; its columns are then held sorted by
group (``input_order``: column ``j`` is input ``input_order[j]``), and a product takes its
activations in that order (``x[:, input_order]``), which gives the same sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from molink.errors import WeightLoadError


@dataclass(frozen=True)
class GroupInts:
    """``q`` int16 [N, K]; ``scale`` and ``offset`` float32 [N, K // group]."""

    q: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor
    group: int
    source_type: str  # "Q4_K", "awq", "int4" ... for messages and reports
    file_bytes: int  # bytes the checkpoint spends on this matrix
    input_order: torch.Tensor | None = None  # long [K]: the input of each column (act-order)

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.q.shape[0]), int(self.q.shape[1]))

    def __post_init__(self) -> None:
        n, k = self.q.shape
        if k % self.group:
            raise WeightLoadError(
                f"{self.source_type} matrix has {k} inputs, not a multiple of its group "
                f"size {self.group}"
            )
        expected = (n, k // self.group)
        for name in ("scale", "offset"):
            got = tuple(getattr(self, name).shape)
            if got != expected:
                raise WeightLoadError(
                    f"{self.source_type} {name} has shape {got}, expected {expected}"
                )

    def dequantize(self) -> torch.Tensor:
        """The float32 matrix the integers stand for (a reference; kernels never call it)."""
        n, k = self.shape
        q = self.q.view(n, k // self.group, self.group).float()
        w = (q * self.scale[..., None] + self.offset[..., None]).view(n, k)
        if self.input_order is None:
            return w
        inputs = torch.empty_like(w)
        inputs[:, self.input_order] = w
        return inputs

    def rows(self, index: torch.Tensor) -> GroupInts:
        return GroupInts(
            self.q[index],
            self.scale[index],
            self.offset[index],
            self.group,
            self.source_type,
            self.file_bytes * int(index.numel()) // max(1, self.shape[0]),
            self.input_order,
        )


def cat_rows(parts: Sequence[GroupInts]) -> GroupInts:
    """Matrices stacked along output rows (fused q/k/v, gate/up); groups must agree."""
    first = parts[0]
    for part in parts[1:]:
        if part.group != first.group or part.shape[1] != first.shape[1]:
            raise WeightLoadError(
                f"cannot fuse a {part.source_type} [{part.shape[0]}, {part.shape[1]}] group "
                f"{part.group} matrix with a {first.source_type} [{first.shape[0]}, "
                f"{first.shape[1]}] group {first.group} one"
            )
        if not _same_order(part.input_order, first.input_order):
            raise WeightLoadError(
                f"cannot fuse {part.source_type} matrices whose act-order input orders differ"
            )
    types = sorted({p.source_type for p in parts})
    return GroupInts(
        torch.cat([p.q for p in parts]),
        torch.cat([p.scale for p in parts]),
        torch.cat([p.offset for p in parts]),
        first.group,
        "+".join(types),
        sum(p.file_bytes for p in parts),
        first.input_order,
    )


def _same_order(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return torch.equal(a, b)


def quantize_float(weight: torch.Tensor, bits: int, group: int = 32) -> GroupInts:
    """Round a float matrix to ``bits``-bit integers per group (on-the-fly int4/int8).

    Asymmetric min/max per group (as llama.cpp's Q4_1 and AWQ do): the group's range maps
    onto 0 .. 2**bits - 1, centred on zero so that 8-bit values fit int8.
    """
    if bits not in (4, 8):
        raise WeightLoadError(f"on-the-fly quantization takes 4 or 8 bits, not {bits}")
    w = weight.detach().float()
    n, k = w.shape
    if k % group:
        raise WeightLoadError(f"a [{n}, {k}] matrix does not split into groups of {group}")
    groups = w.reshape(n, k // group, group)
    lo, hi = groups.amin(-1), groups.amax(-1)
    levels = (1 << bits) - 1
    scale = (hi - lo) / levels
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((groups - lo[..., None]) / safe[..., None]).round().clamp(0, levels)
    centre = 1 << (bits - 1)
    q = (q - centre).to(torch.int16)
    offset = lo + centre * scale
    return GroupInts(q.view(n, k), scale, offset, group, f"int{bits}", n * k * 4)
