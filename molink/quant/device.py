"""Quantized matrices on an accelerator: which kernel holds a matrix on which device.

CPU matrices stay in molink.quant.linear (int4 planes, the float16 batch copy). On CUDA:
``fp8`` puts float matrices in fp8 with row scales (molink.quant.fp8); every other
quantized matrix (GGUF, AWQ, GPTQ, on-the-fly int4/int8) becomes int4 planes for
tinygemm (molink.quant.cuda_int4). Other devices are refused at load, naming the device.
"""

from __future__ import annotations

from typing import Protocol

import torch

from molink.errors import InvalidParameterError
from molink.quant.groups import GroupInts, quantize_float


class DeviceMatrix(Protocol):
    """A quantized matrix resident on an accelerator."""

    @property
    def nbytes(self) -> int: ...

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """float32 ``x @ W.T``."""
        ...

    def gather_rows(self, index: torch.Tensor) -> torch.Tensor:
        """float32 rows ``index`` of W."""
        ...


def check_device(device: torch.device) -> None:
    if device.type not in ("cpu", "cuda"):
        raise InvalidParameterError(
            "quantization", f"quantized weights run on cpu or cuda; {device.type} is not supported"
        )


def device_matrix(
    weight: torch.Tensor | GroupInts,
    device: torch.device,
    bits: int | None,
    fp8: bool,
    table: bool,
) -> DeviceMatrix | None:
    """The matrix on ``device`` (CUDA), or None where it stays a float matrix."""
    from molink.quant.cuda_int4 import to_cuda_int4
    from molink.quant.fp8 import Fp8Rows, check_fp8_device

    if fp8:
        check_fp8_device(device)
        dense = weight.dequantize() if isinstance(weight, GroupInts) else weight
        return Fp8Rows(dense.to(device))
    if isinstance(weight, GroupInts):
        return to_cuda_int4(weight, device, table)
    if bits is not None:
        return to_cuda_int4(quantize_float(weight, bits), device, table)
    return None
