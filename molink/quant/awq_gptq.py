"""AWQ and GPTQ checkpoints: 4-bit (GPTQ also 8-bit) integers packed in int32, read into
``GroupInts``.

Both keep, per linear layer ``X``, ``X.qweight`` (eight 4-bit integers per int32),
``X.qzeros`` (the same for each group's zero point) and ``X.scales`` (float16,
[in / group, out]); the weight is ``W[o, i] = (q[i, o] - zero[i / group, o]) * scale``.

* AWQ (AutoAWQ's GEMM layout): qweight [in, out / 8] and qzeros [in / group, out / 8],
  packed along outputs in the order 0, 2, 4, 6, 1, 3, 5, 7 within each int32.
* GPTQ (AutoGPTQ / GPTQModel): qweight [in / 8, out] packed along inputs, qzeros
  [in / group, out / 8] packed along outputs in order (8-bit, as Qwen's GPTQ-Int8: four
  integers per int32, [in / 4, out] and [in / group, out / 4], held centred on 128 so
  that they fit int4.plane_split's two planes), each zero stored minus one (format
  v1, ``checkpoint_format`` ``gptq`` or absent) or as it is (``gptq_v2``, GPTQModel's);
  other layouts (``marlin``, ``bitblas``, ...) are refused naming them. Act-order
  checkpoints (``desc_act``: ``g_idx`` puts inputs that are not neighbours in one group)
  are held with their columns sorted by group (``GroupInts.input_order``).

The integers and float16 scales are taken exactly (``offset = -zero * scale``); the int4
kernel's bfloat16 scales are the only rounding (molink.quant.int4).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from molink.errors import WeightLoadError
from molink.quant.groups import GroupInts
from molink.quant.int4 import KERNEL_GROUPS

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# group_size of checkpoints with one scale and zero point per output row.
PER_CHANNEL = -1
# GPTQ checkpoint formats read, and what each adds to a stored zero point.
GPTQ_ZERO_OFFSETS = {"gptq": 1, "gptq_v2": 0}
QUANTIZED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def _nibbles(packed: torch.Tensor, bits: int = 4) -> torch.Tensor:
    """int32 [..., n] -> int16 [..., n, 32 / bits]: field j of each int32 (least
    significant first); ``bits`` 4 (nibbles) or 8 (bytes)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    mask = (1 << bits) - 1
    return ((packed.to(torch.int32)[..., None] >> shifts) & mask).to(torch.int16)


def _unpack_outputs(packed: torch.Tensor, order: tuple[int, ...], bits: int = 4) -> torch.Tensor:
    """[rows, out * bits / 32] int32 packed along outputs -> [rows, out] int16."""
    nib = _nibbles(packed, bits)  # [rows, out * bits / 32, 32 / bits]: field j
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    return nib[..., inverse].reshape(packed.shape[0], -1)


def quant_settings(raw_config: dict[str, Any], method: str) -> tuple[int, int]:
    """(bits, group size) from ``quantization_config``: AWQ 4-bit, GPTQ 4- or 8-bit. Group
    size -1 (one scale per output row, GPTQ's "per channel") is returned as -1."""
    quant = raw_config.get("quantization_config") or {}
    bits = int(quant.get("bits", quant.get("w_bit", 4)))
    group = int(quant.get("group_size", quant.get("q_group_size", 128)))
    allowed = (4, 8) if method == "gptq" else (4,)
    if bits not in allowed:
        raise WeightLoadError(
            f"quantization_config.bits = {bits}: {method} runs "
            f"{' or '.join(map(str, allowed))}-bit only"
        )
    if group <= 0 and group != PER_CHANNEL:
        raise WeightLoadError(
            f"quantization_config.group_size = {group}: a group size is > 0, or -1 (per channel)"
        )
    if method == "awq" and str(quant.get("version", "gemm")).lower() != "gemm":
        raise WeightLoadError(
            f"quantization_config.version = {quant.get('version')!r}: AWQ runs the GEMM layout"
        )
    if method == "gptq":
        gptq_zero_offset(raw_config)
    return bits, group


def gptq_zero_offset(raw_config: dict[str, Any]) -> int:
    """What a GPTQ checkpoint's stored zero points need added (``checkpoint_format``)."""
    quant = raw_config.get("quantization_config") or {}
    layout = quant.get("checkpoint_format") or "gptq"
    if layout not in GPTQ_ZERO_OFFSETS:
        raise WeightLoadError(
            f"quantization_config.checkpoint_format = {layout!r}: GPTQ runs "
            f"{' and '.join(GPTQ_ZERO_OFFSETS)} checkpoints only"
        )
    return GPTQ_ZERO_OFFSETS[layout]


def awq_group_ints(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int
) -> GroupInts:
    q = _unpack_outputs(qweight, AWQ_ORDER)  # [in, out]
    zeros = _unpack_outputs(qzeros, AWQ_ORDER)  # [in / group, out]
    group = q.shape[0] if group == PER_CHANNEL else group
    return _group_ints(q, zeros, scales, group, "awq", qweight, qzeros)


def gptq_group_ints(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group: int,
    g_idx: torch.Tensor | None = None,
    zero_offset: int = 1,
    bits: int = 4,
) -> GroupInts:
    """``zero_offset``: added to the stored zero points (1 for format v1, 0 for v2);
    ``bits``: 4 (eight integers per int32) or 8 (four)."""
    q = _nibbles(qweight, bits).permute(0, 2, 1).reshape(-1, qweight.shape[1])  # [in, out]
    group = q.shape[0] if group == PER_CHANNEL else group
    order = None if g_idx is None else act_order(g_idx, q.shape[0], group)
    if order is not None:
        q = q[order]  # inputs sorted by group: each group's inputs side by side
    zeros = _unpack_outputs(qzeros, tuple(range(32 // bits)), bits) + zero_offset
    # 8-bit integers 0..255 are held centred (-128..127: two int4 planes, int4.plane_split).
    center = 128 if bits == 8 else 0
    ints = _group_ints(q - center, zeros - center, scales, group, "gptq", qweight, qzeros)
    return ints if order is None else replace(ints, input_order=order)


def act_order(g_idx: torch.Tensor, inputs: int, group: int) -> torch.Tensor | None:
    """The inputs sorted by their group (None where ``g_idx`` is ``i // group`` already);
    every group must hold ``group`` inputs, as GPTQ's act-order writes them."""
    g_idx = g_idx.to(torch.long)
    expected = torch.arange(inputs) // group
    if g_idx.shape != (inputs,):
        raise WeightLoadError(f"GPTQ g_idx has shape {tuple(g_idx.shape)}, expected ({inputs},)")
    if torch.equal(g_idx, expected):
        return None
    order = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[order], expected):
        raise WeightLoadError(
            f"GPTQ g_idx does not put {group} inputs in every group (group size {group})"
        )
    return order


def _group_ints(
    q: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    group: int,
    method: str,
    *packed: torch.Tensor,
) -> GroupInts:
    inputs, outputs = q.shape
    if tuple(scales.shape) != (inputs // group, outputs) or tuple(zeros.shape) != tuple(
        scales.shape
    ):
        raise WeightLoadError(
            f"{method} scales {tuple(scales.shape)} / zeros {tuple(zeros.shape)} do not fit a "
            f"[{outputs}, {inputs}] matrix in groups of {group}"
        )
    scale = scales.float().t().contiguous()  # [out, in / group]
    offset = -zeros.float().t() * scale
    file_bytes = sum(t.numel() * t.element_size() for t in packed) + scales.numel() * 2
    if group > KERNEL_GROUPS[-1]:
        # Per channel (or groups wider than the kernel's): the same scale and zero point
        # repeated over the largest kernel group that divides the group, exactly.
        kernel_group = next((g for g in reversed(KERNEL_GROUPS) if group % g == 0), group)
        repeat = group // kernel_group
        scale, offset = scale.repeat_interleave(repeat, 1), offset.repeat_interleave(repeat, 1)
        group = kernel_group
    return GroupInts(q.t().contiguous(), scale, offset.contiguous(), group, method, file_bytes)
