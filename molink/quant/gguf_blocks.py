"""Decoding llama.cpp's quantized blocks into ``GroupInts`` (integers, scale, offset).

The bit layouts are ggml's (ggml-quants.c, the ``block_q*`` structs); the ``gguf`` package's
numpy dequantizers are the reference the unit tests compare against. Every type but Q6_K
decodes exactly into groups of 32: each 32 weights share one scale and one offset.

Q6_K scales every 16 weights by its own int8; torch's int4 kernels take groups of at least
32, so each pair of 16-weight sub-blocks is put on the larger of the two scales and the
other sub-block's integers are re-rounded onto it (4x finer steps than Q6_K's 6 bits, so
the added error is at most 1/8 of the larger sub-block's step, 1/4 where an opposite-signed
half of equal magnitude reaches the int8 limit: 2 weights in 102,400 of random blocks;
tests/unit/test_quant_gguf.py measures it).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from molink.errors import WeightLoadError
from molink.quant.groups import GroupInts

GROUP = 32


def _f16(raw: np.ndarray, start: int) -> np.ndarray:
    """Little-endian float16 at byte ``start`` of every block, as float32 [blocks]."""
    return raw[:, start : start + 2].copy().view(np.float16)[:, 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """ggml's 32-weight nibble order: the 16 low nibbles, then the 16 high ones."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(raw, 0)
    q = _nibbles(raw[:, 2:18]).astype(np.int16) - 8
    return q, d, np.zeros_like(d)


def _q4_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, m = _f16(raw, 0), _f16(raw, 2)
    return _nibbles(raw[:, 4:20]).astype(np.int16), d, m


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5_0/Q5_1: bit j of the 32-bit ``qh`` is the fifth bit of weight j."""
    bits = qh.copy().view(np.uint32)[:, 0]
    return ((bits[:, None] >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int16)


def _q5_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(raw, 0)
    q = _nibbles(raw[:, 6:22]).astype(np.int16) | (_high_bits(raw[:, 2:6]) << 4)
    return q - 16, d, np.zeros_like(d)


def _q5_1(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d, m = _f16(raw, 0), _f16(raw, 2)
    q = _nibbles(raw[:, 8:24]).astype(np.int16) | (_high_bits(raw[:, 4:8]) << 4)
    return q, d, m


def _q8_0(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    d = _f16(raw, 0)
    q = raw[:, 2:34].copy().view(np.int8).astype(np.int16)
    return q, d, np.zeros_like(d)


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 8 six-bit scales and mins of a Q4_K/Q5_K super-block (ggml's get_scale_min_k4)."""
    s = packed.astype(np.int16)
    low_sc, low_m = s[:, 0:4] & 63, s[:, 4:8] & 63
    high_sc = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    high_m = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return np.concatenate([low_sc, high_sc], 1), np.concatenate([low_m, high_m], 1)


def _k_groups(raw: np.ndarray, q: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 8 groups of 32 per 256-weight super-block; w = d*sc*q - dmin*m."""
    d, dmin = _f16(raw, 0), _f16(raw, 2)
    sc, m = _k_scales(raw[:, 4:16])
    scale = d[:, None] * sc.astype(np.float32)
    offset = -dmin[:, None] * m.astype(np.float32)
    return q.reshape(-1, GROUP), scale.reshape(-1), offset.reshape(-1)


def _q4_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    qs = raw[:, 16:144].reshape(-1, 4, 32)  # four chunks of 64 weights
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=-1).astype(np.int16)  # [blocks, 4, 64]
    return _k_groups(raw, q.reshape(-1, 256))


def _q5_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    qh = raw[:, 16:48].astype(np.int16)  # [blocks, 32]: bit 2j / 2j+1 for chunk j
    qs = raw[:, 48:176].reshape(-1, 4, 32).astype(np.int16)
    shifts = np.arange(4, dtype=np.int16)[None, :, None] * 2
    high_lo = ((qh[:, None, :] >> shifts) & 1) << 4
    high_hi = ((qh[:, None, :] >> (shifts + 1)) & 1) << 4
    q = np.concatenate([(qs & 0x0F) | high_lo, (qs >> 4) | high_hi], axis=-1)
    return _k_groups(raw, q.reshape(-1, 256))


def _q6_k(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ql = raw[:, 0:128].reshape(-1, 2, 64).astype(np.int16)
    qh = raw[:, 128:192].reshape(-1, 2, 1, 32).astype(np.int16)
    sc = raw[:, 192:208].copy().view(np.int8).astype(np.float32)  # [blocks, 16]
    d = _f16(raw, 208)
    high = (qh >> (np.arange(4, dtype=np.int16)[None, None, :, None] * 2)) & 3  # [b,2,4,32]
    low = np.stack([ql[:, :, :32] & 0x0F, ql[:, :, 32:] & 0x0F, ql[:, :, :32] >> 4,
                    ql[:, :, 32:] >> 4], axis=2)  # fmt: skip
    q = ((low | (high << 4)) - 32).reshape(-1, 8, 2, 16)  # 8 groups of two 16-weight halves
    pair = sc.reshape(-1, 8, 2)
    # The scale of larger magnitude, sign kept: its half maps to 4 * (q - 32) in -128..124.
    pick = np.abs(pair).argmax(-1)[..., None]
    larger = np.take_along_axis(pair, pick, -1)[..., 0]  # [blocks, 8]
    safe = np.where(larger != 0, larger, 1.0)
    # Both halves on that scale, 4 steps per original step (an opposite-signed half of
    # equal magnitude at q = 0 would need +128 and is clipped to 127).
    ratio = pair / safe[..., None] * 4.0
    merged = np.clip(np.rint(q * ratio[..., None]), -128, 127).astype(np.int16)
    scale = d[:, None] * larger / 4.0
    return merged.reshape(-1, GROUP), scale.reshape(-1), np.zeros_like(scale).reshape(-1)


Decoder = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]
# type name: (bytes per block, weights per block, decoder)
BLOCK_TYPES: dict[str, tuple[int, int, Decoder]] = {
    "Q4_0": (18, 32, _q4_0),
    "Q4_1": (20, 32, _q4_1),
    "Q5_0": (22, 32, _q5_0),
    "Q5_1": (24, 32, _q5_1),
    "Q8_0": (34, 32, _q8_0),
    "Q4_K": (144, 256, _q4_k),
    "Q5_K": (176, 256, _q5_k),
    "Q6_K": (210, 256, _q6_k),
}


def decode_blocks(raw: np.ndarray, type_name: str, rows: int, cols: int) -> GroupInts:
    """``raw``: the tensor's bytes (any shape); ``rows`` x ``cols`` weights, row-major."""
    spec = BLOCK_TYPES.get(type_name)
    if spec is None:
        raise WeightLoadError(
            f"GGUF type {type_name} cannot stay quantized; supported: {', '.join(BLOCK_TYPES)}"
        )
    block_bytes, block_weights, decoder = spec
    if cols % block_weights:
        raise WeightLoadError(f"{type_name} rows of {cols} weights are not whole blocks")
    blocks = rows * cols // block_weights
    flat = np.ascontiguousarray(raw).reshape(-1)
    if flat.size != blocks * block_bytes:
        raise WeightLoadError(
            f"{type_name} tensor holds {flat.size} bytes, expected {blocks * block_bytes}"
        )
    q, scale, offset = decoder(flat.reshape(blocks, block_bytes))
    return GroupInts(
        torch.from_numpy(np.ascontiguousarray(q).reshape(rows, cols)),
        torch.from_numpy(np.ascontiguousarray(scale, dtype=np.float32).reshape(rows, -1)),
        torch.from_numpy(np.ascontiguousarray(offset, dtype=np.float32).reshape(rows, -1)),
        GROUP,
        type_name,
        int(flat.size),
    )
