"""Matmuls for decode-sized batches on CPU, with weights prepacked for oneDNN.

MKL's sgemm re-packs the weight matrix on every call; with 2-32 rows (a decode batch) that
repacking dominates, and the weights stream from memory twice. oneDNN can keep a weight
in its preferred blocked layout, which makes these calls 1.5-2x faster. Single rows
(batch-1 decode) and large batches (prefill) stay on MKL, which is faster there, so the
packed copy is kept alongside the plain weight: it costs one more copy of the matrices.

bfloat16 weights are packed too where the CPU has bfloat16 dot products: unpacked,
``F.linear`` in bfloat16 is slower than float32 at one row (SmolLM2's products 19.6 ms
against 17.3 on an AMD EPYC with avx512_bf16); packed they take 10.2 ms at one row and
29.2 at 32 (float32 packed: 55.2), and packed wins at every row count measured (1-512).
So a bfloat16 layer keeps only its packed copy (``serves_every_batch``): the plain matrix
would double its memory and never be read.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PACKED_MIN_ROWS = 2
PACKED_MAX_ROWS = 32


@functools.cache
def bf16_packing_available() -> bool:
    """oneDNN can pack and multiply bfloat16 on this CPU (natively or emulated)."""
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
        and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )


@functools.cache
def native_bf16() -> bool:
    """The CPU multiplies bfloat16 in hardware (avx512_bf16 or AMX tiles)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def prepack_supported(weight: torch.Tensor) -> bool:
    """float32 anywhere oneDNN is; bfloat16 where the CPU multiplies it natively (packed,
    1.9-2.4x ``F.linear``'s bfloat16 at one row and never slower up to 512 rows on an AMD
    EPYC with avx512_bf16; emulated bfloat16 is not worth a second copy)."""
    if weight.device.type != "cpu":
        return False
    if weight.dtype == torch.bfloat16:
        return native_bf16() and bf16_packing_available()
    return (
        weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def onednn_pack(weight: torch.Tensor) -> torch.Tensor:
    """oneDNN's blocked layout of ``weight`` [out, in] (float32 or bfloat16), unchecked."""
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)


def packed_matmul(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ W.T (+ bias)`` through ``onednn_pack``'s layout; x in the packed dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def serves_every_batch(packed: torch.Tensor | None) -> bool:
    """Whether the packed copy multiplies batches of every size: bfloat16 (faster at every
    row count measured), so the plain matrix beside it is never read and need not be kept."""
    return packed is not None and packed.dtype == torch.bfloat16


def unpack(packed: torch.Tensor, in_features: int) -> torch.Tensor:
    """The plain matrix's transpose [in, out] back from ``onednn_pack``'s layout, exactly:
    the identity times the matrix adds one product by 1 to zeros in each sum."""
    eye = torch.eye(in_features, dtype=packed.dtype, device=packed.device)
    return packed_matmul(eye, packed)


def _use_packed(packed: torch.Tensor | None, rows: int) -> bool:
    """float32: 2-32 rows (MKL is faster for one row and for prefill); bfloat16: always."""
    if packed is None:
        return False
    return serves_every_batch(packed) or PACKED_MIN_ROWS <= rows <= PACKED_MAX_ROWS


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's layout of ``weight`` [out, in], or None where that is not available."""
    if not prepack_supported(weight):
        return None
    try:
        return onednn_pack(weight)
    except RuntimeError as exc:  # a torch build without the kernel for this shape
        logger.debug("no oneDNN prepacking: %s", exc)
        return None


def linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ weight.T + bias``, through the packed weight when the batch suits it."""
    if _use_packed(packed, x.shape[0]):
        return packed_matmul(x, packed, bias)
    return F.linear(x, weight, bias)


def add_linear(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``residual + x @ weight.T (+ bias)``; without bias on MKL one addmm does both."""
    if _use_packed(packed, x.shape[0]):
        return residual + packed_matmul(x, packed, bias)
    if bias is None:
        return torch.addmm(residual, x, weight.t())
    return residual + F.linear(x, weight, bias)
