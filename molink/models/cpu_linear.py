"""Matmuls for decode-sized batches on CPU, with weights prepacked for oneDNN.

MKL's sgemm re-packs the weight matrix on every call; with 2-32 rows (a decode batch) that
repacking dominates, and the weights stream from memory twice. oneDNN can keep a weight
in its preferred blocked layout, which makes these calls 1.5-2x faster. Single rows
(batch-1 decode) and large batches (prefill) stay on MKL, which is faster there, so the
packed copy is kept alongside the plain weight: it costs one more copy of the matrices.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

PACKED_MIN_ROWS = 2
PACKED_MAX_ROWS = 32


def prepack_supported(weight: torch.Tensor) -> bool:
    return (
        weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
    )


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's layout of ``weight`` [out, in], or None where that is not available."""
    if not prepack_supported(weight):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), None)
    except RuntimeError as exc:  # a torch build without the kernel for this shape
        logger.debug("no oneDNN prepacking: %s", exc)
        return None


def linear(
    x: torch.Tensor, weight: torch.Tensor, packed: torch.Tensor | None, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x @ weight.T + bias``, through the packed weight when the batch suits it."""
    if packed is not None and PACKED_MIN_ROWS <= x.shape[0] <= PACKED_MAX_ROWS:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return F.linear(x, weight, bias)


def add_linear(
    residual: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    packed: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """``residual + x @ weight.T (+ bias)``; without bias on MKL one addmm does both."""
    if packed is not None and PACKED_MIN_ROWS <= x.shape[0] <= PACKED_MAX_ROWS:
        return residual + torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    if bias is None:
        return torch.addmm(residual, x, weight.t())
    return residual + F.linear(x, weight, bias)
