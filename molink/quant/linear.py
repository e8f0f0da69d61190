"""Quantized linear layers for CPU: int4 planes, with the kernel chosen per batch size.

Candidates measured side by side on one thread of this AVX2 CPU (no AVX-512), one
SmolLM2-135M forward pass (30 layers + LM head, weights streaming from memory), ms per
pass by rows (bench/quant_kernels.py; bench/results/quant_kernels*.json):

    rows                         1      4      8     16     32     64    128    256
    float32 (MKL)               84    358    287    257    399    778   2072   7183
    float32 (oneDNN packed)    143    202    182    300    534    688
    int4 g32 kernel (bf16)      58     96    217    435    700   1846   8367   9980
    int4 dequantize + MKL*    1716   1768   1024   3530   1925   2379   9056   7971
    int8 per-row kernel         43     80     84    188    308    757
    bfloat16 F.linear          110    244    591
    (* the first dequantizing code, writing floats into strided halves)

torch's ``_weight_int4pack_mm_for_cpu`` is the only kernel that keeps a Q4 file's bytes
(its float32-activation path is 25x slower: 3.6 ms vs 0.14 ms on q/k/v at 1 row); the
per-row int8 kernel is fastest but needs one scale per row, a lossy re-rounding of GGUF's
group-32 scales at 1.6x a Q4 file's bytes; oneDNN's packed bfloat16 GEMM refuses this CPU
(it needs AVX-512 or AVX-NE-CONVERT); torchao 0.18's x86 wheel has CUDA kernels only and
calls the same int4 kernel on CPU; ``_dyn_quant_matmul_4bit`` is a reference loop on x86.
The int4 kernel's time grows with the rows (it is compute-bound without AVX-512); the
dequantizing path is flat in rows; with nibbles unpacked in uint8 the two tie between 96
and 128 rows (interleaved, ms per pass: 16 rows 1542 vs 4656, 32: 1848 vs 4017, 48: 1262
vs 1785, 64: 2103 vs 3845, 96: 2398 vs 2203, 128: 2881 vs 3022, medians of 3 on a loaded
machine; bench/results/quant_kernels_crossover.json). So up to
``INT4_MAX_ROWS`` rows (decode batches of up to 128 sequences) the kernel
runs; larger batches (prefill chunks) dequantize a band of rows at a time into a small
float32 buffer and multiply with MKL, keeping nothing but the int4 planes resident. Both
paths read the same bfloat16 scales.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from molink.errors import WeightLoadError
from molink.quant.groups import GroupInts, quantize_float
from molink.quant.int4 import Int4Planes, padded_rows, to_int4_planes

# Up to this many rows the int4 kernel beats dequantize-and-multiply (module doc).
INT4_MAX_ROWS = 128
# Elements per band of dequantized rows: 2**17 float32 (512 KiB) stays in a core's L2.
BAND_ELEMENTS = 1 << 17


def _band_rows(cols: int) -> int:
    return max(64, (BAND_ELEMENTS // cols) // 64 * 64)


def dequant_matmul(planes: Int4Planes, x: torch.Tensor) -> torch.Tensor:
    """float32 ``x @ W.T`` for x float32 [T, cols], one band of W's rows at a time.

    Each band is dequantized in the packed blocking ([blocks, cols, block], see
    ``Int4Planes.dequantize_blocks``) and multiplied block by block in one batched product.
    """
    rows, padded = planes.rows, padded_rows(planes.rows)
    out = torch.empty(x.shape[0], padded, dtype=torch.float32)
    band = _band_rows(planes.cols)
    for start in range(0, padded, band):
        end = min(start + band, padded)
        w_t = planes.dequantize_blocks(start, end)  # [blocks, cols, block]
        part = torch.bmm(x.expand(w_t.shape[0], *x.shape), w_t)  # [blocks, T, block]
        out[:, start:end] = part.transpose(0, 1).reshape(x.shape[0], end - start)
    return out[:, :rows] if rows != padded else out


class QuantLinear(nn.Module):
    """``y = x @ W.T (+ b)`` with W kept as int4 planes (a ``LinearLike``).

    ``load_weight`` takes a ``GroupInts`` (a quantized checkpoint) or, with ``bits`` set,
    a float matrix quantized on the fly; a float matrix without ``bits`` stays float (a
    quantized checkpoint may keep small matrices unquantized).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool, bits: int | None = None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bits = bits
        self.bias = nn.Parameter(torch.zeros(out_features), False) if bias else None
        self.planes: Int4Planes | None = None
        self.dense: torch.Tensor | None = None
        self.source_type = "unloaded"

    @property
    def weight_bytes(self) -> int:
        if self.planes is not None:
            return self.planes.nbytes
        return 0 if self.dense is None else self.dense.numel() * self.dense.element_size()

    def load_weight(self, weight: torch.Tensor | GroupInts, pack: bool) -> None:
        if isinstance(weight, GroupInts):
            ints = weight
        elif self.bits is not None:
            ints = quantize_float(weight, self.bits)
        else:
            self._check_shape(tuple(weight.shape))
            self.dense, self.planes = weight.float().contiguous(), None
            self.source_type = "float32"
            return
        self._check_shape(ints.shape)
        self.planes, self.dense = to_int4_planes(ints), None
        self.source_type = ints.source_type

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if shape != (self.out_features, self.in_features):
            raise WeightLoadError(
                f"matrix has shape {shape}, expected ({self.out_features}, {self.in_features})"
            )

    def prepack(self, enable: bool) -> None:
        """Nothing to do: the int4 planes are the kernel's packed form already."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.planes is None:
            if self.dense is None:
                raise WeightLoadError("quantized linear layer used before its weight was loaded")
            y = F.linear(x.float(), self.dense)
        elif x.shape[0] <= INT4_MAX_ROWS:
            y = self.planes.matmul(x.to(torch.bfloat16)).float()
        else:
            y = dequant_matmul(self.planes, x.float())
        if self.bias is not None:
            y += self.bias
        return y.to(x.dtype)

    def add_to(self, residual: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return residual + self(x)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` of W as float32 (the same matrix as an input embedding)."""
        if self.planes is None:
            if self.dense is None:
                raise WeightLoadError("quantized embedding used before its weight was loaded")
            return F.embedding(ids, self.dense)
        return self.planes.gather_rows(ids)
