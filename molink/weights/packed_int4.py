"""AWQ/GPTQ checkpoints seen through Hugging Face names: ``X.weight`` is ``GroupInts``.

The architectures' bindings name ``X.weight``; such checkpoints hold ``X.qweight``,
``X.qzeros``, ``X.scales`` (and GPTQ's ``X.g_idx``) instead. This store answers the
former from the latter, decoded by molink.quant.awq_gptq; other tensors pass through.
"""

from __future__ import annotations

import torch

from molink.quant.awq_gptq import QUANTIZED_SUFFIXES, awq_group_ints, gptq_group_ints
from molink.quant.groups import GroupInts
from molink.weights.source import TensorStore


class PackedInt4Store(TensorStore):
    def __init__(
        self, inner: TensorStore, method: str, group: int, zero_offset: int = 1, bits: int = 4
    ) -> None:
        """``zero_offset``: what GPTQ's stored zero points need added; ``bits``: GPTQ's
        4 or 8 (molink.quant.awq_gptq)."""
        super().__init__()
        self._zero_offset = zero_offset
        self._bits = bits
        self._inner = inner
        self._method = method
        self._group = group
        inner_names = inner.names()
        self._quantized = {
            name.removesuffix(".qweight") for name in inner_names if name.endswith(".qweight")
        }
        hidden = {f"{base}.{suffix}" for base in self._quantized for suffix in QUANTIZED_SUFFIXES}
        self._names = [n for n in inner_names if n not in hidden]
        self._names += [f"{base}.weight" for base in sorted(self._quantized)]

    def names(self) -> list[str]:
        return list(self._names)

    def describe(self) -> str:
        return self._inner.describe()

    def close(self) -> None:
        self._inner.close()

    def _read(self, name: str) -> torch.Tensor:
        base = name.removesuffix(".weight")
        if base not in self._quantized or base == name:
            return self._inner[name]
        return self._group_ints(base)  # type: ignore[return-value]

    def _group_ints(self, base: str) -> GroupInts:
        qweight = self._inner[base + ".qweight"]
        qzeros = self._inner[base + ".qzeros"]
        scales = self._inner[base + ".scales"]
        if self._method == "awq":
            return awq_group_ints(qweight, qzeros, scales, self._group)
        g_idx = self._inner[base + ".g_idx"] if base + ".g_idx" in self._inner else None
        return gptq_group_ints(
            qweight, qzeros, scales, self._group, g_idx, self._zero_offset, self._bits
        )
