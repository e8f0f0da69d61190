"""Turn a tiny float checkpoint into AWQ or GPTQ form (their tensor layouts), and into the
float checkpoint those integers stand for, so that a test can load both and compare.

Packing follows the formats' public descriptions: AWQ (GEMM) packs eight 4-bit values
per int32 along outputs in the order 0, 2, 4, 6, 1, 3, 5, 7; GPTQ packs qweight along
inputs in order and stores each zero point minus one (format v1) or as it is (v2).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def quantize(
    weight: torch.Tensor, group: int, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per group: q [out, in], zeros [out, in/g] in 0..2**bits - 1, scales fp16."""
    out, inp = weight.shape
    top = (1 << bits) - 1
    groups = weight.float().view(out, inp // group, group)
    lo, hi = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scales = ((hi - lo) / top).clamp(min=1e-6).half()
    zeros = (-lo / scales.float()).round().clamp(0, top)
    q = (groups / scales.float()[..., None] + zeros[..., None]).round().clamp(0, top)
    return q.view(out, inp).to(torch.int32), zeros.to(torch.int32), scales


def dequantized(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group: int):
    out, inp = q.shape
    z = zeros.repeat_interleave(group, dim=1).float()
    s = scales.float().repeat_interleave(group, dim=1)
    return (q.float() - z) * s


def _pack(values: torch.Tensor, order: tuple[int, ...], bits: int = 4) -> torch.Tensor:
    """[rows, n] 0..2**bits - 1 -> [rows, n / per] int32 (per = 32 / bits integers), field j
    holding column per * c + order[j]."""
    rows, n = values.shape
    per = 32 // bits
    v = values.view(rows, n // per, per)[..., list(order)].to(torch.int64)
    packed = torch.zeros(rows, n // per, dtype=torch.int64)
    for j in range(per):
        packed |= v[..., j] << (bits * j)
    return (packed - ((packed >> 31) & 1) * (1 << 32)).to(torch.int32)  # as signed int32


def awq_tensors(q, zeros, scales) -> dict[str, torch.Tensor]:
    return {
        "qweight": _pack(q.t().contiguous(), AWQ_ORDER),  # [in, out / 8]
        "qzeros": _pack(zeros.t().contiguous(), AWQ_ORDER),  # [in / g, out / 8]
        "scales": scales.t().contiguous(),  # [in / g, out]
    }


def gptq_tensors(
    q,
    zeros,
    scales,
    group: int,
    v2: bool = False,
    g_idx: torch.Tensor | None = None,
    bits: int = 4,
) -> dict[str, torch.Tensor]:
    """GPTQ's layout; ``v2`` (``checkpoint_format: gptq_v2``) stores zero points as they
    are, format v1 minus one; ``g_idx``: each input's group (act-order), else ``i // group``."""
    inp = q.shape[1]
    order = tuple(range(32 // bits))
    stored_zeros = zeros if v2 else (zeros - 1) & ((1 << bits) - 1)
    return {
        "qweight": _pack(q.contiguous(), order, bits).t().contiguous(),  # [in * bits / 32, out]
        "qzeros": _pack(stored_zeros.t().contiguous(), order, bits),
        "scales": scales.t().contiguous(),
        "g_idx": (torch.arange(inp) // group if g_idx is None else g_idx).to(torch.int32),
    }


def act_order_quantize(weight: torch.Tensor, group: int):
    """GPTQ act-order: groups of inputs taken in a shuffled order (the same for every matrix
    with as many inputs, as q/k/v and gate/up share theirs). Returns q [out, in] in input
    order, zeros and scales per group, g_idx, and the float matrix they stand for."""
    inp = weight.shape[1]
    order = torch.randperm(inp, generator=torch.Generator().manual_seed(inp))
    q_sorted, zeros, scales = quantize(weight[:, order], group)
    q = torch.empty_like(q_sorted)
    q[:, order] = q_sorted
    g_idx = torch.empty(inp, dtype=torch.long)
    g_idx[order] = torch.arange(inp) // group
    floats = torch.empty(weight.shape)
    floats[:, order] = dequantized(q_sorted, zeros, scales, group)
    return q, zeros, scales, g_idx, floats


def make_int4_checkpoints(
    float_dir: Path,
    out_root: Path,
    method: str,
    group: int,
    checkpoint_format: str = "gptq",
    act_order: bool = False,
    bits: int = 4,
):
    """(quantized dir, dequantized float dir) built from ``float_dir``; a GPTQ
    ``checkpoint_format`` other than ``gptq`` (v1) is written into the config;
    ``act_order``: GPTQ with ``desc_act`` (groups of shuffled inputs)."""
    tensors = load_file(str(float_dir / "model.safetensors"))
    quant, deq = dict(tensors), dict(tensors)
    for name, weight in tensors.items():
        if not any(f".{linear}.weight" in name for linear in LINEARS):
            continue
        g_idx = None
        size = weight.shape[1] if group == -1 else group  # -1: one group per row
        if act_order:
            q, zeros, scales, g_idx, deq[name] = act_order_quantize(weight, size)
        else:
            q, zeros, scales = quantize(weight, size, bits)
            deq[name] = dequantized(q, zeros, scales, size)
        base = name.removesuffix(".weight")
        del quant[name]
        v2 = checkpoint_format == "gptq_v2"
        packed = (
            awq_tensors(q, zeros, scales)
            if method == "awq"
            else gptq_tensors(q, zeros, scales, size, v2=v2, g_idx=g_idx, bits=bits)
        )
        quant.update({f"{base}.{k}": v for k, v in packed.items()})
    config = json.loads((float_dir / "config.json").read_text())
    quant_config = {"quant_method": method, "bits": bits, "group_size": group}
    quant_config.update({"version": "gemm", "zero_point": True} if method == "awq" else {
        "desc_act": False, "sym": False})  # fmt: skip
    if method == "gptq" and checkpoint_format != "gptq":
        quant_config["checkpoint_format"] = checkpoint_format
    if act_order:
        quant_config["desc_act"] = True
    dirs = []
    for kind, data, cfg in (
        ("q", quant, {**config, "quantization_config": quant_config}),
        ("f", deq, config),
    ):
        target = out_root / f"{method}-{group}-{kind}"
        shutil.copytree(float_dir, target)
        save_file(data, str(target / "model.safetensors"), metadata={"format": "pt"})
        (target / "config.json").write_text(json.dumps(cfg))
        dirs.append(target)
    return dirs[0], dirs[1]
