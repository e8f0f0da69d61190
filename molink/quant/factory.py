"""The linear-layer factory of a quantized slice (plugs into molink.models' one seam)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from molink.models.blocks.linear import LinearFactory, LinearLike
from molink.models.parallel.shard import Segment
from molink.quant.fp16_gemm import fp16_gemm_available
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
            in_features, out_features, bias, self.bits, self.float_kernel, self.device, fp8=self.fp8
        )

    def row(self, segments: Sequence[Segment], out_features: int, bias: bool = False) -> LinearLike:
        """Attention's output and the MLP's down projection: the matrices whose inputs
        int8 activations keep (molink.quant.kernels ``int8act``)."""
        return QuantLinear(
            sum(s.size for s in segments), out_features, bias, self.bits, self.batch_kernel,
            self.device, fp8=self.fp8,
        )  # fmt: skip

    @property
    def float_kernel(self) -> str:
        """The kernel of the other matrices (q/k/v, gate/up, LM head: they read normalised
        hidden states, whose outlier channels int8 activations lose; SmolLM2 Q4_1's top-1
        agreement with float32 falls to 96.3% with every matrix in int8, 98.0% with the LM
        head in int8, and is 98.8% with only these row matrices): ``int8act`` keeps them
        in float16."""
        if self.batch_kernel != "int8act":
            return self.batch_kernel
        return "fp16" if fp16_gemm_available() else "int4"

    def table(self, rows: int, cols: int) -> QuantLinear:
        return QuantLinear(
            cols, rows, False, self.bits, self.float_kernel, self.device, True, self.fp8
        )
