"""Checkpoints stored in fp8, seen as float matrices: ``X.weight`` is ``fp8 x scale``.

vLLM's ``fp8`` and llm-compressor's ``compressed-tensors`` (float-quantized) formats store
each linear layer's ``X.weight`` as ``float8_e4m3fn`` beside ``X.weight_scale``: one scale
per tensor ([] or [1]), per output row ([N] or [N, 1]), or per block of the matrix
([ceil(N / bn), ceil(K / bk)], ``weight_block_size`` [bn, bk] in the quantization config;
DeepSeek-style checkpoints name it ``X.weight_scale_inv``, which also multiplies). This
store answers ``X.weight`` with ``fp8.float() * scale`` in float32, exact (an e4m3 value
times a float32 scale rounds once, in float32), and hides the scales and any static
``X.input_scale`` (the activations stay in the compute dtype). The stage then holds the
matrix in its compute dtype (float32 or bfloat16, molink.weights.source): the CPU has no
fp8 matrix product.
"""

from __future__ import annotations

import torch

from molink.errors import WeightLoadError
from molink.weights.source import TensorStore

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIXES = ("weight_scale", "weight_scale_inv", "input_scale")


class Fp8Store(TensorStore):
    def __init__(self, inner: TensorStore, block: tuple[int, int] | None) -> None:
        super().__init__()
        self._inner = inner
        self._block = block
        names = inner.names()
        self._names = [n for n in names if n.rsplit(".", 1)[-1] not in SCALE_SUFFIXES]
        self._scaled = {n.rsplit(".", 1)[0] for n in names if n.endswith(SCALE_SUFFIXES[:2])}

    def names(self) -> list[str]:
        return list(self._names)

    def describe(self) -> str:
        return self._inner.describe()

    def close(self) -> None:
        self._inner.close()

    def _read(self, name: str) -> torch.Tensor:
        tensor = self._inner[name]
        if tensor.dtype not in FP8_DTYPES:
            return tensor
        base = name.removesuffix(".weight")
        if base == name or base not in self._scaled:
            raise WeightLoadError(f"fp8 tensor {name} has no weight_scale beside it")
        scale_name = next(f"{base}.{s}" for s in SCALE_SUFFIXES[:2] if f"{base}.{s}" in self._inner)
        return dequantize(tensor, self._inner[scale_name].float(), self._block, name)


def dequantize(
    weight: torch.Tensor, scale: torch.Tensor, block: tuple[int, int] | None, name: str
) -> torch.Tensor:
    """float32 ``weight * scale`` for a per-tensor, per-row or per-block ``scale``."""
    rows, cols = weight.shape
    values = weight.float()
    if scale.numel() == 1:
        return values * scale.reshape(())
    if scale.numel() == rows and (scale.dim() == 1 or scale.shape[-1] == 1):
        return values * scale.reshape(rows, 1)
    if block is not None and scale.dim() == 2:
        bn, bk = block
        expected = (-(-rows // bn), -(-cols // bk))
        if tuple(scale.shape) == expected:
            full = scale.repeat_interleave(bn, 0)[:rows].repeat_interleave(bk, 1)[:, :cols]
            return values * full
    raise WeightLoadError(
        f"fp8 tensor {name} [{rows}, {cols}] has a scale of shape {tuple(scale.shape)}: "
        f"expected one per tensor, per row ({rows}) or per block {list(block or [])}"
    )
