"""The linear-layer factory of a quantized slice (plugs into molink.models' one seam)."""

from __future__ import annotations

from dataclasses import dataclass

from molink.models.blocks.linear import LinearFactory, LinearLike
from molink.quant.linear import QuantLinear


@dataclass(frozen=True)
class QuantLinearFactory(LinearFactory):
    """Every matrix a ``QuantLinear``; the embedding and the LM head too (``table``).

    ``bits``: quantize float matrices on the fly (int4/int8); None keeps float matrices of
    a quantized checkpoint as they are (AWQ/GPTQ leave the embedding and head in float).
    ``batch_kernel``: how batches multiply (molink.quant.kernels).
    """

    bits: int | None = None
    batch_kernel: str = "int4"
    fp8: bool = False  # fp8 rows on CUDA (molink.quant.fp8)

    def linear(self, in_features: int, out_features: int, bias: bool = False) -> LinearLike:
        return QuantLinear(
            in_features, out_features, bias, self.bits, self.batch_kernel, self.device, fp8=self.fp8
        )

    def table(self, rows: int, cols: int) -> QuantLinear:
        return QuantLinear(
            cols, rows, False, self.bits, self.batch_kernel, self.device, True, self.fp8
        )
