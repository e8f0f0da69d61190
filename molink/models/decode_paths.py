"""Decode attention that reads the paged cache where it lies.

* On CUDA: the Triton kernel (molink/kernels/triton_decode.py) walks each sequence's
  block table; nothing is gathered.
* On a CPU: long sequences are attended one at a time over strided views of their runs of
  consecutive slots (molink/models/decode_plan.py); only short runs are copied.
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch
import torch.nn.functional as F

from molink.kernels.paged_reference import DecodeParams, paged_decode_reference
from molink.models.decode_plan import InPlaceDecode

logger = logging.getLogger(__name__)


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_triton(device: torch.device) -> bool:
    """The Triton kernel runs where Triton compiles: CUDA devices."""
    return device.type == "cuda" and triton_installed()


def decode_params(q: torch.Tensor, head_dim_v: int, window: int | None, options) -> DecodeParams:
    scale = options.scale if options.scale is not None else q.shape[-1] ** -0.5
    return DecodeParams(scale, head_dim_v, window, options.softcap, options.sinks)


def decode_triton(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    lengths: torch.Tensor,
    params: DecodeParams,
) -> torch.Tensor:
    """``q`` [B, H, D] -> [B, H * Dv]. Off CUDA (tests of the paths around the kernel),
    the PyTorch reference stands in for it."""
    if q.device.type == "cuda":
        from molink.kernels.triton_decode import paged_decode  # imports triton: CUDA only

        out = paged_decode(q, key_cache, value_cache, block_table, lengths, params)
    else:
        out = paged_decode_reference(q, key_cache, value_cache, block_table, lengths, params)
    return out.reshape(q.shape[0], -1)


def _pieces(flat: torch.Tensor, plan: InPlaceDecode) -> list[torch.Tensor]:
    pieces = [flat[run.start : run.start + run.length] for run in plan.views]
    if plan.gathered is not None:
        pieces.append(flat.index_select(0, plan.gathered))
    return pieces


def decode_in_place(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    plan: InPlaceDecode,
    params: DecodeParams,
) -> torch.Tensor:
    """One sequence's new token (row ``plan.row`` of ``q`` [T, H, D]) -> [H * Dv]."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[2]
    keys = _pieces(key_cache.view(-1, num_kv_heads, head_dim), plan)
    if value_cache.shape[-1]:
        values = _pieces(value_cache.view(-1, num_kv_heads, value_cache.shape[-1]), plan)
    else:  # latent attention: values are the keys' first channels
        values = [k[..., : params.head_dim_v] for k in keys]
    if keys[0].dtype != q.dtype:  # a cache stored in another dtype (--kv-cache-dtype)
        keys = [k.to(q.dtype) for k in keys]
        values = [v.to(q.dtype) for v in values]
    query = q[plan.row].view(num_kv_heads, num_heads // num_kv_heads, head_dim)
    plain = params.softcap is None and params.sinks is None
    if len(keys) == 1 and plain:
        out = F.scaled_dot_product_attention(
            query.unsqueeze(0),
            keys[0].transpose(0, 1).unsqueeze(0),
            values[0].transpose(0, 1).unsqueeze(0),
            scale=params.scale,
        )
        return out.reshape(-1)
    return _pieces_attention(query, keys, values, params).reshape(-1)


def _pieces_attention(
    query: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], params: DecodeParams
) -> torch.Tensor:
    """Softmax over the keys of every piece at once; ``query`` [kv, group, D], pieces
    [n, kv, D]. Returns [kv, group, Dv]."""
    scores = torch.cat([torch.matmul(query, k.permute(1, 2, 0)) for k in keys], dim=-1)
    scores = scores * params.scale
    if params.softcap is not None:
        scores = torch.tanh(scores / params.softcap) * params.softcap
    if params.sinks is not None:
        sinks = params.sinks.view(scores.shape[0], scores.shape[1], 1).to(scores.dtype)
        probs = torch.softmax(torch.cat((scores, sinks), dim=-1).float(), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores.float(), dim=-1)
    probs = probs.to(values[0].dtype)
    out = None
    offset = 0
    for v in values:
        part = torch.matmul(probs[..., offset : offset + v.shape[0]], v.transpose(0, 1))
        out = part if out is None else out + part
        offset += v.shape[0]
    assert out is not None
    return out
