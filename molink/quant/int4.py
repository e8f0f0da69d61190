"""Weights as one or two planes of 4-bit integers for torch's CPU int4 kernel.

``torch.ops.aten._weight_int4pack_mm_for_cpu`` computes ``x @ W.T`` with W stored as
4-bit integers q in 0..15 and, per group of 32..256 inputs and output row, a scale and a
zero point: ``W = (q - 8) * scale + zero``. A ``GroupInts`` matrix whose integers span
at most 16 values is one such plane; wider integers (Q5, Q6_K, Q8_0, int8: -128..127)
split exactly into a high plane ``q >> 4`` (scale 16 s, zero 0) and a low plane
``q & 15`` (scale s, zero 8 s + offset), whose products add up to the product with W.

The kernel takes its scales and zero points in the activations' dtype and is only fast in
bfloat16 (float32 takes a generic path 10-100x slower; bench/results/quant_kernels.json).
Rounding a float16 GGUF scale to bfloat16 keeps 8 of its 11 significant bits: a relative
error of at most 2**-9 per group, the only rounding of the lossless types; where a zero
point absorbs an offset (Q4_1, Q4_K, Q5_1, Q5_K, AWQ, GPTQ) its bfloat16 rounding is
relative to the zero point itself. ``rounding_report`` measures both on a real matrix.

Two planes of a layer's matrix are joined along the inputs, ``[high | low]``
(``Int4Planes.join_planes``: the packed layout of the [N, 2K] matrix, each plane's bytes a
slice of it), and run as one kernel call on ``[x | x]``: the planes' products add up in
the kernel's float32 accumulator and the sum is rounded to bfloat16 once, where two calls
round each plane's product and add them in float32. The same integers and scales, one
pass over activations and outputs instead of two. SmolLM2's Q8_0 LM head (49152 x 576),
one thread, AVX-512 EPYC, weights out of cache, ms per product and the relative RMS error
against the float64 product with gguf's dequantized matrix (bench/quant_q8_head.py,
bench/results/quant_q8_head.json: medians of 15 interleaved rounds, load 1.4-1.5):

    rows                              1      2      8     error (1 row)   bytes held
    two int4 calls                  2.34   2.50   6.07    4.0e-3          35.4 MB
    one call, planes joined         1.94   2.22   5.67    4.0e-3          35.4 MB
    int8, one scale per row         1.74   1.79   3.85    1.7e-2          28.4 MB
    MatMulNBits 8-bit, int8 act.    1.59   2.47   3.54    8.4e-3          31.9 MB
    fbgemm float16 copy             1.87   2.01   2.96    2.7e-4          56.6 MB
    oneDNN bfloat16 copy            1.78   1.95   2.63    3.9e-3          56.6 MB
    float32 (MKL)                   6.16  11.96  10.91    2.6e-7         113.2 MB

An LM head's logits come out of the kernel in bfloat16, 1/8 apart at 16..32: near ties
become exact ties and argmax takes the lower id. ``Int4Planes.logits`` recomputes the
outputs tied at a row's top in float32 (W's rows as held, x as given: the float32
product), so argmax orders them as float32 does; other logits are the kernel's. On SmolLM2
Q4_1's teacher-forced predictions (tests/unit/test_quant_smollm.py, 20 prompts x 64,
against the same model in float32) the top two logits are exactly equal in 2 of 1280 with
two calls and 56 with one; agreement is 1251 with two calls, 1245 with one, and 1270
with one call and ties broken. A row without a tie costs a max and a compare over the
vocabulary (``int4_joined_ties`` above).

The candidates faster than the int4 kernel at one row fail a bar: ``_weight_int8pack_mm``
has one scale per output row, so Q8_0's 32-weight scales are requantized onto it (about
4x the error, and its logits are bfloat16 as well); onnxruntime's ``MatMulNBits``
(activations rounded to int8 per block of 32) and the float16/bfloat16 copies hold the
matrix again beside the planes the tied embedding gathers from (+32 to +57 MB, where
SmolLM2 Q4_1 holds 101.9 MB against the 127.9 its 1.3x-file memory bar allows). The int4
kernel with float16 activations (finer logits) takes a generic path 40-100x slower.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from molink.errors import WeightLoadError
from molink.quant.groups import GroupInts

KERNEL_GROUPS = (32, 64, 128, 256)
SCALE_DTYPE = torch.bfloat16
# The op's binding in torch's namespace: a built-in call, where ``torch.ops.aten``'s packet
# adds a Python frame to each of a decode step's ~120 products.
_INT4_MM = torch._weight_int4pack_mm_for_cpu


@functools.cache
def packed_block() -> int:
    """Rows per block in the kernel's packed layout, found by packing a probe.

    On AVX2 builds the layout is [N / 32, K, 16] bytes, byte (b, k, j) holding row
    32 b + j in its low nibble and row 32 b + 16 + j in its high one; other CPU builds may
    block by 64. Unpacking (for the embedding and for large batches) needs the block size.
    """
    probe = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(0))
    packed = pack_plane(probe.to(torch.int32))
    for block in (32, 64, 16, 128):
        if torch.equal(unpack_plane(packed, 128, 64, block), probe.to(torch.uint8)):
            return block
    raise WeightLoadError("this torch build packs int4 weights in an unknown layout")


def pack_plane(q: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def unpack_plane(packed: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """uint8 [rows, cols] integers 0..15 back from the packed layout."""
    p = packed.view(rows // block, cols, block // 2)
    both = torch.cat([p & 0x0F, p >> 4], dim=2)  # [rows / block, cols, block]
    return both.transpose(1, 2).reshape(rows, cols)


def padded_rows(rows: int) -> int:
    """The kernel packs rows in blocks; matrices are padded with zero rows to 64."""
    return -(-rows // 64) * 64


@dataclass
class Int4Planes:
    """``packed``: one or two packed planes; ``scale_zero`` [planes, K / group, N, 2] bf16."""

    packed: list[torch.Tensor]
    scale_zero: torch.Tensor
    rows: int
    cols: int
    group: int
    # Each plane with its scales, sliced once at load: a decode step runs ~120 products.
    _kernel_args: list[tuple[torch.Tensor, torch.Tensor]] = field(
        init=False, repr=False, compare=False
    )
    # Two planes joined along the inputs (``join_planes``): what one kernel call
    # multiplies, [N, planes * K / 2] bytes and [planes * K / group, N, 2] scales.
    joined: tuple[torch.Tensor, torch.Tensor] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        self._kernel_args = [(p, self.scale_zero[i]) for i, p in enumerate(self.packed)]

    def join_planes(self) -> None:
        """Hold two planes as one [N, 2K] matrix, multiplied in one call (module doc).

        The kernel's layout is [N / block, K, block / 2] bytes, so the [N, 2K] matrix's is
        the planes' blocks joined along K; the planes become views into it (no second
        copy) and every other path reads them as before."""
        count = len(self.packed)
        if count == 1 or self.joined is not None:
            return
        padded, half = padded_rows(self.rows), packed_block() // 2
        blocks = [p.reshape(-1, self.cols, half) for p in self.packed]
        joined = torch.cat(blocks, dim=1)  # [N / block, planes * K, block / 2]
        scales = self.scale_zero.view(-1, *self.scale_zero.shape[2:])
        self.joined = (joined.view(padded, -1), scales)
        self.packed = [joined[:, i * self.cols : (i + 1) * self.cols] for i in range(count)]
        self._kernel_args = []  # the planes alone are not contiguous: the kernel refuses them

    @classmethod
    def from_joined(
        cls, joined: torch.Tensor, scale_zero: torch.Tensor, rows: int, cols: int, group: int
    ) -> Int4Planes:
        """Planes as ``join_planes`` leaves them, from its [N, planes * K / 2] bytes and
        [planes, K / group, N, 2] scales as saved: views into those tensors, so a matrix
        read from the packed cache's mapped file is not copied (its pages and a joined
        copy would both be resident)."""
        count = scale_zero.shape[0]
        blocks = joined.view(-1, count * cols, packed_block() // 2)
        planes = cls(
            [blocks[:, i * cols : (i + 1) * cols] for i in range(count)],
            scale_zero,
            rows,
            cols,
            group,
        )
        scales = scale_zero.view(-1, *scale_zero.shape[2:])
        planes.joined = (joined, scales)
        planes._kernel_args = []
        return planes

    def plane_tensors(self) -> list[torch.Tensor]:
        """Each plane as the kernel packs it alone ([N, K / 2] bytes, contiguous)."""
        padded = padded_rows(self.rows)
        return [p.reshape(padded, self.cols // 2).contiguous() for p in self.packed]

    @property
    def nbytes(self) -> int:
        data = sum(p.numel() * p.element_size() for p in self.packed)
        return data + self.scale_zero.numel() * self.scale_zero.element_size()

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` through the int4 kernel; x is [T, cols] bfloat16 (the result is
        bfloat16 for one plane, float32 for two)."""
        out = self._product(x)
        if len(self.packed) > 1:
            out = out.float()
        return out if out.shape[1] == self.rows else out[:, : self.rows]

    def matmul_float(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``x @ W.T`` for float x [T, cols]: exactly ``matmul(x.to(bfloat16))
        .float()`` (the path of every decode-sized product)."""
        out = self._product(x.to(torch.bfloat16)).float()
        return out if out.shape[1] == self.rows else out[:, : self.rows]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``matmul_float`` for an LM head: where a row's largest output is shared by
        several outputs (bfloat16 ties values that float32 tells apart), those outputs are
        recomputed in float32 from W's rows and x itself (module doc)."""
        y = self.matmul_float(x)
        top = y.amax(dim=-1, keepdim=True)
        # Every output at the top adds ``tiny`` to its row's sum, every other one nothing
        # (bfloat16 values below the top lie at least 4 ``tiny`` under it), so only a row
        # whose top is shared reaches 2 ``tiny``. Float ops only: a comparison's bool
        # result over the vocabulary costs several times more.
        tiny = torch.ldexp(torch.ones_like(top), torch.frexp(top.abs()).exponent - 11)
        shared = (y - (top - tiny)).clamp_min_(0).sum(dim=-1) > 1.5 * tiny[:, 0]
        if bool(shared.any()):
            rows = shared.nonzero()[:, 0]
            which, outputs = (y[rows] == top[rows]).nonzero(as_tuple=True)
            rows = rows[which]
            y[rows, outputs] = (self.gather_rows(outputs) * x[rows].float()).sum(-1)
        return y

    def _product(self, x: torch.Tensor) -> torch.Tensor:
        """[T, padded rows]: bfloat16 from one call (one plane, or joined planes on
        ``[x | x]``); float32 from separate planes, whose products add up in float32 (a
        bfloat16 sum would round the total once more)."""
        if self.joined is not None:
            packed, scale_zero = self.joined
            return _INT4_MM(x.repeat(1, len(self.packed)), packed, self.group, scale_zero)
        args = self._kernel_args
        packed, scale_zero = args[0]
        out = _INT4_MM(x, packed, self.group, scale_zero)
        if len(args) == 1:
            return out
        out = out.float()
        for packed, scale_zero in args[1:]:
            out += _INT4_MM(x, packed, self.group, scale_zero)
        return out

    def dequantize_blocks(self, start: int, end: int) -> torch.Tensor:
        """float32 W.T of rows [start, end) in the kernel's blocking: [blocks, cols, block],
        entry (b, k, j) = W[start + b * block + j, k]. ``start``/``end`` are multiples of
        the block. Built in this layout, no transposing copy is needed."""
        block = packed_block()
        half, nb = block // 2, (end - start) // block
        groups = self.cols // self.group
        out: torch.Tensor | None = None
        for plane, packed in enumerate(self.packed):
            p = packed.view(-1, self.cols, half)[start // block : end // block]
            # cat of the two nibble halves in uint8, then one conversion: writing floats
            # into strided halves of a buffer is 2x slower (measured).
            w = torch.cat([p & 0x0F, p >> 4], dim=2).float()  # [nb, cols, block]
            sz = self.scale_zero[plane, :, start:end].float()  # [groups, rows, 2]
            scale = sz[..., 0].view(groups, nb, 1, block).transpose(0, 1).contiguous()
            zero = (sz[..., 1] - 8 * sz[..., 0]).view(groups, nb, 1, block).transpose(0, 1)
            w.view(nb, groups, self.group, block).mul_(scale).add_(zero.contiguous())
            out = w if out is None else out.add_(w)
        assert out is not None
        return out

    def dequantize_rows(self, start: int, end: int) -> torch.Tensor:
        """float32 [end - start, cols] rows of W (block-aligned), row-major."""
        blocks = self.dequantize_blocks(start, end)
        return blocks.permute(0, 2, 1).reshape(end - start, self.cols)

    def gather_rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 [len(index), cols]: rows of W (the embedding lookup).

        One plane, or joined planes, are read in one pass: ~30 small ops fewer per decode
        step for a two-plane table (SmolLM2's Q8_0 embedding) than a pass per plane."""
        count = len(self.packed)
        if count > 1 and self.joined is None:
            return self._gather_rows_apart(index)
        source = self.packed[0] if self.joined is None else self.joined[0]
        block = packed_block()
        half = block // 2
        rows, within = len(index), index % block
        p = source.view(-1, count * self.cols, half)
        bytes_ = p[index // block, :, within % half]  # [T, count * cols]
        shift = ((within >= half).to(torch.uint8) * 4)[:, None]
        q = ((bytes_ >> shift) & 0x0F).view(rows, count, -1, self.group).float()
        sz = self.scale_zero[:, :, index].float()  # [count, K / group, T, 2]
        scale = sz[..., 0].permute(2, 0, 1).contiguous()[..., None]  # [T, count, groups, 1]
        zero = (sz[..., 1] - 8 * sz[..., 0]).permute(2, 0, 1).contiguous()[..., None]
        w = torch.addcmul(zero, q, scale)  # [T, count, groups, group]
        # The planes' sum in plane order, as ``_gather_rows_apart`` adds them.
        return (w[:, 0] if count == 1 else w.sum(1)).view(rows, self.cols)

    def _gather_rows_apart(self, index: torch.Tensor) -> torch.Tensor:
        """``gather_rows`` for planes held apart (not joined), a pass per plane."""
        block = packed_block()
        half = block // 2
        within = index % block
        out: torch.Tensor | None = None
        for plane, packed in enumerate(self.packed):
            p = packed.view(-1, self.cols, half)
            bytes_ = p[index // block, :, within % half]  # [T, cols]
            shift = ((within >= half).to(torch.uint8) * 4)[:, None]
            q = ((bytes_ >> shift) & 0x0F).view(len(index), -1, self.group).float()
            sz = self.scale_zero[plane][:, index].float()  # [K / group, T, 2]
            scale = sz[..., 0].t().contiguous()[..., None]
            zero = (sz[..., 1].t() - 8 * sz[..., 0].t()).contiguous()[..., None]
            w = torch.addcmul(zero, q, scale).view(len(index), self.cols)
            out = w if out is None else out.add_(w)
        assert out is not None
        return out


def plane_split(g: GroupInts) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(q 0..15, scale, zero) per plane with W = sum over planes of (q - 8) * scale + zero."""
    lo, hi = int(g.q.min()), int(g.q.max())
    if lo >= -8 and hi <= 7:
        return [(g.q + 8, g.scale, g.offset)]
    if lo >= 0 and hi <= 15:
        return [(g.q, g.scale, g.offset + 8 * g.scale)]
    if lo < -128 or hi > 127:
        raise WeightLoadError(f"{g.source_type} integers {lo}..{hi} do not fit 8 bits")
    high = (g.q >> 4) + 8  # arithmetic shift: -8..7
    low = g.q & 0x0F
    return [(high, 16 * g.scale, torch.zeros_like(g.scale)), (low, g.scale, g.offset + 8 * g.scale)]


def padded_plane_parts(g: GroupInts, kernel: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each plane's integers [N padded, K] and its scales/zero points [K / group, N padded,
    2] in SCALE_DTYPE, rows padded to what the int4 kernels tile (padding rows are zeros)."""
    if g.group not in KERNEL_GROUPS:
        raise WeightLoadError(
            f"{g.source_type} group size {g.group} is not one the {kernel} takes "
            f"({', '.join(map(str, KERNEL_GROUPS))})"
        )
    rows, cols = g.shape
    padded = padded_rows(rows)
    parts = []
    for q, scale, zero in plane_split(g):
        if padded != rows:
            q = torch.cat([q, torch.full((padded - rows, cols), 8, dtype=q.dtype)])
            scale = torch.cat([scale, torch.zeros(padded - rows, scale.shape[1])])
            zero = torch.cat([zero, torch.zeros(padded - rows, zero.shape[1])])
        parts.append((q, torch.stack([scale.t(), zero.t()], dim=-1).to(SCALE_DTYPE)))
    return parts


def to_int4_planes(g: GroupInts) -> Int4Planes:
    parts = padded_plane_parts(g, "int4 kernel")
    packed = [pack_plane(q) for q, _ in parts]
    scale_zero = torch.stack([sz for _, sz in parts]).contiguous()
    return Int4Planes(packed, scale_zero, g.shape[0], g.shape[1], g.group)


def rounding_report(g: GroupInts, planes: Int4Planes) -> dict[str, float]:
    """How far the packed matrix is from the exact one: max and mean absolute error, and
    the max error in units of the matrix's smallest nonzero quantization step per group."""
    exact = g.dequantize()
    got = planes.dequantize_rows(0, padded_rows(g.shape[0]))[: g.shape[0]]
    err = (got - exact).abs()
    step = g.scale.abs().repeat_interleave(g.group, dim=1)
    rel = (err / step.clamp_min(1e-30))[step > 0]
    return {
        "max_abs": float(err.max()),
        "mean_abs": float(err.mean()),
        "max_in_steps": float(rel.max()) if rel.numel() else 0.0,
    }
