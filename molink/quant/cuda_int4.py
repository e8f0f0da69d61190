"""Int4 planes on CUDA through torch's tinygemm kernel (``_weight_int4pack_mm``).

The same decomposition as on CPU (molink.quant.int4: one or two planes of integers
0..15, ``W = (q - 8) * scale + zero`` per group, scales and zero points bfloat16
[K / group, N, 2]); only the packing differs: ``_convert_weight_to_int4pack`` takes
two integers per byte along the inputs (even input in the high nibble) and tiles them
for tensor cores, ``inner_k_tiles`` tiles of 16 inputs at a time (8, 4 or 2: the largest
that divides K / 16, as torchao picks it). The kernel needs N a multiple of 8 (rows are
padded to 64 already) and bfloat16 activations. Chosen because it ships inside torch
(no other extension to build against the torch pin) and is the kernel torchao's
int4 weight-only layout runs on CUDA.

A table (the embedding, which is also the tied LM head) keeps its bytes unpacked beside
the tiled copy, so that rows can be gathered (0.5 bytes per weight more, tables only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from molink.errors import WeightLoadError
from molink.quant.groups import GroupInts
from molink.quant.int4 import padded_plane_parts

INNER_K_TILES = (8, 4, 2)


def inner_k_tiles(cols: int) -> int:
    for tiles in INNER_K_TILES:
        if cols % (tiles * 16) == 0:
            return tiles
    raise WeightLoadError(
        f"a matrix with {cols} inputs does not fit the CUDA int4 kernel (a multiple of 32)"
    )


def nibble_bytes(q: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K / 2] from integers 0..15 [N, K]: input 2j in the high nibble."""
    q = q.to(torch.uint8)
    return (q[:, ::2] << 4) | q[:, 1::2]


def unpack_nibble_bytes(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of ``nibble_bytes``: uint8 integers 0..15 [N, K]."""
    return torch.stack([packed >> 4, packed & 0x0F], dim=-1).reshape(packed.shape[0], -1)


@dataclass
class CudaInt4Planes:
    tiled: list[torch.Tensor]
    scale_zero: torch.Tensor  # [planes, K / group, N padded, 2] bfloat16
    rows: int
    cols: int
    group: int
    raw: list[torch.Tensor] | None = None  # tables: nibble bytes [N padded, K / 2] per plane

    @property
    def nbytes(self) -> int:
        tensors = [*self.tiled, self.scale_zero, *(self.raw or [])]
        return sum(t.numel() * t.element_size() for t in tensors)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``x @ W.T``; planes add up in float32."""
        x = x.to(torch.bfloat16).contiguous()
        out = torch.zeros(x.shape[0], self.scale_zero.shape[2], device=x.device)
        for plane, tiled in enumerate(self.tiled):
            out += torch.ops.aten._weight_int4pack_mm(
                x, tiled, self.group, self.scale_zero[plane]
            ).float()
        return out[:, : self.rows]

    def gather_rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 rows ``index`` of W (the embedding lookup)."""
        if self.raw is None:
            raise WeightLoadError("rows of a CUDA int4 matrix are kept for tables only")
        out = torch.zeros(len(index), self.cols, device=index.device)
        for plane, raw in enumerate(self.raw):
            q = unpack_nibble_bytes(raw[index]).float().view(len(index), -1, self.group)
            sz = self.scale_zero[plane][:, index].float()  # [K / group, T, 2]
            scale, zero = sz[..., 0].t()[..., None], sz[..., 1].t()[..., None]
            out += ((q - 8) * scale + zero).view(len(index), self.cols)
        return out


def byte_planes(g: GroupInts) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Nibble bytes [N padded, K / 2] per plane and scales/zero points [planes, K / group,
    N padded, 2] bfloat16: everything but the tiling, on the CPU."""
    parts = padded_plane_parts(g, "CUDA int4 kernel")
    raw = [nibble_bytes(q) for q, _ in parts]
    return raw, torch.stack([sz for _, sz in parts]).contiguous()


def to_cuda_int4(g: GroupInts, device: torch.device, table: bool) -> CudaInt4Planes:
    tiles = inner_k_tiles(g.shape[1])
    raw, scale_zero = byte_planes(g)
    raw = [plane.to(device) for plane in raw]
    tiled = [torch.ops.aten._convert_weight_to_int4pack(plane, tiles) for plane in raw]
    rows, cols = g.shape
    return CudaInt4Planes(tiled, scale_zero.to(device), rows, cols, g.group, raw if table else None)
