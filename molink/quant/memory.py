"""What a slice's weights hold in memory, and the factory for a quantization method."""

from __future__ import annotations

import torch
from torch import nn

from molink.models.blocks.linear import DenseLinear, LinearFactory
from molink.models.decoder import DecoderSlice
from molink.quant.config import ON_THE_FLY_BITS
from molink.quant.device import check_device
from molink.quant.factory import QuantLinearFactory
from molink.quant.linear import QuantLinear


def quant_factory(
    method: str, dtype: torch.dtype, device: torch.device, batch_kernel: str = "int4"
) -> LinearFactory | None:
    """None for float weights (the slice's default factory); else quantized layers whose
    batches run ``batch_kernel`` (molink.quant.kernels)."""
    if method == "none":
        return None
    check_device(device)
    bits = ON_THE_FLY_BITS.get(method)
    return QuantLinearFactory(dtype, device, bits, batch_kernel, fp8=method == "fp8")


def _tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def resident_weight_bytes(model: nn.Module) -> int:
    """Bytes of every weight the slice keeps: parameters, quantized planes and the float
    matrices' oneDNN-packed copies, each shared tensor once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors: list[torch.Tensor] = list(module.parameters(recurse=False))
        if isinstance(module, QuantLinear) and id(module) not in seen:
            seen.add(id(module))
            total += module.weight_bytes
        if isinstance(module, DenseLinear) and module.packed is not None:
            tensors.append(module.packed)
        if isinstance(module, DecoderSlice) and module.lm_head_packed is not None:
            tensors.append(module.lm_head_packed)
        for tensor in tensors:
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += _tensor_bytes(tensor)
    return total


class ResidentMemory:
    """Bytes this process holds for serving, by kind ("weights", "kv_cache"), for /metrics.

    Stages record what they load; a process serves one model, so the totals are its own.
    """

    def __init__(self) -> None:
        self._bytes: dict[str, int] = {}

    def add(self, kind: str, nbytes: int) -> None:
        self._bytes[kind] = self._bytes.get(kind, 0) + int(nbytes)

    def get(self, kind: str) -> int:
        return self._bytes.get(kind, 0)

    def metric_lines(self) -> list[str]:
        lines: list[str] = []
        for kind, help_text in (
            ("weights", "Bytes of model weights this process holds (quantized where they are)."),
            ("kv_cache", "Bytes of KV cache this process reserved."),
        ):
            name = f"molink:resident_{kind}_bytes"
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines.append(f"{name} {self.get(kind)}")
        return lines


RESIDENT = ResidentMemory()
