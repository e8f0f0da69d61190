"""What a slice's weights hold in memory, and the factory for a quantization method."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

import torch
from torch import nn

from molink.models.blocks.linear import DenseLinear, LinearFactory
from molink.models.decoder import DecoderSlice
from molink.models.parallel.layers import VocabParallelTable
from molink.quant.config import ON_THE_FLY_BITS
from molink.quant.device import check_device
from molink.quant.factory import QuantLinearFactory
from molink.quant.linear import QuantLinear

logger = logging.getLogger(__name__)


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
        if isinstance(module, (DenseLinear, VocabParallelTable)) and module.packed is not None:
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


def return_freed_memory() -> int:
    """Give the pages that load-time buffers left free back to the system (glibc's
    ``malloc_trim``); returns the bytes of resident memory that went, 0 without glibc.

    Building an engine frees more than it keeps: the tokenizer read once for the grammar
    compiler, the checkpoint's decoded blocks, the JSON of the tokenizer. glibc keeps the
    freed pages of its heap resident until asked: measured on SmolLM2 Q4_1, ~27 MiB after
    the grammar compiler and ~27 MiB after the tokenizer (bench/quant_memory.py). Called
    once the engine is built, not per step: a step's buffers are reused by the next.
    """
    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return 0
    before = _resident_bytes()
    trim(0)
    freed = max(0, before - _resident_bytes())
    logger.info("returned %.1f MiB of freed load-time memory", freed / 2**20)
    return freed


def _resident_bytes() -> int:
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return 0
