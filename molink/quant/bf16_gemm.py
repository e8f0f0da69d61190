"""A bfloat16 copy of a quantized matrix, packed for oneDNN's bfloat16 GEMM (batches).

oneDNN (PyTorch's bundled CPU kernel library, reached through
``torch.ops.mkldnn._reorder_linear_weight`` / ``_linear_pointwise``) keeps the weights in
its blocked bfloat16 layout and multiplies with the CPU's bfloat16 dot products
(``avx512_bf16``, or AMX tiles where the CPU has them): twice float32's multiply-adds per
instruction and half its bytes. Chosen over fbgemm's float16 GEMM (molink.quant.fp16_gemm)
where the CPU multiplies bfloat16 natively, because fbgemm converts float16 to float32 and
multiplies in float32 (measured on an AMD EPYC with avx512_bf16, one thread, a SmolLM2
forward pass of products, ms at 8 / 32 / 64 rows: packed bfloat16 14.9 / 31.7 / 51.1 with
the activations' conversions, fbgemm float16 17 / 51 / 102, packed float32 25.8 / 55.2 /
92.7; bench/results/quant_kernels_bf16.json). On CPUs without native bfloat16 oneDNN
emulates it and fbgemm's float16 is the faster copy: the README says which wins where.

Activations are rounded to bfloat16 and products come back in bfloat16, as the int4
kernel's do (molink.quant.int4), so a matrix multiplies alike whichever of the two the
step's rows choose; the weights are the dequantized quantized values rounded to bfloat16
(8 significant bits: the measured agreement is in tests/unit/test_quant_smollm.py).
"""

from __future__ import annotations

import torch

from molink.errors import InvalidParameterError

# One check of oneDNN's bfloat16 for the float and the quantized paths (molink.models).
from molink.models.cpu_linear import bf16_packing_available as bf16_gemm_available
from molink.models.cpu_linear import onednn_pack, packed_matmul

__all__ = ["Bf16Packed", "bf16_gemm_available"]


class Bf16Packed:
    """``x @ W.T`` for x [T, cols] with W held as oneDNN-packed bfloat16; float32 out."""

    def __init__(self, weight: torch.Tensor) -> None:
        if not bf16_gemm_available():
            raise InvalidParameterError(
                "quantized_batch_kernel",
                "bf16 needs oneDNN with bfloat16 support (x86 with AVX-512 or AMX); "
                "use fp16 or int4 on this CPU",
            )
        self.rows, self.cols = (int(d) for d in weight.shape)
        self._packed = onednn_pack(weight.to(torch.bfloat16))

    @property
    def nbytes(self) -> int:
        """Two bytes per weight (oneDNN's blocked layout pads to its block: a few percent)."""
        return 2 * self.rows * self.cols

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return packed_matmul(x.to(torch.bfloat16).contiguous(), self._packed).float()
