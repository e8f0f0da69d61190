"""Decode attention that reads the paged cache where it lies.

* On CUDA: the Triton kernel (molink/kernels/triton_decode.py) walks each sequence's
  block table; nothing is gathered.
* On a CPU: long sequences are attended one at a time over strided views of their runs of
  consecutive slots (molink/models/decode_plan.py); only short runs are copied. A lone
  shorter sequence in one run of slots is read through views too (``decode_keys_values``);
  other batches gather their blocks into one padded copy.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from molink.kernels.paged_reference import DecodeParams, paged_decode_reference
from molink.models.decode_plan import InPlaceDecode

if TYPE_CHECKING:
    from molink.models.attention_metadata import DecodeGroup

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


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """A float8 tensor (an fp8 KV cache) as its uint8 bytes, others as they are: copying
    kernels (index_copy_, index_select) are not built for float8 on every device."""
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


def _select(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``flat.index_select(0, index)``, through the bytes of a float8 cache."""
    if flat.dtype != torch.float8_e4m3fn:
        return flat.index_select(0, index)
    return flat.view(torch.uint8).index_select(0, index).view(flat.dtype)


def _pieces(flat: torch.Tensor, plan: InPlaceDecode) -> list[torch.Tensor]:
    pieces = [flat[run.start : run.start + run.length] for run in plan.views]
    if plan.gathered is not None:
        pieces.append(_select(flat, plan.gathered))
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
    key_flat = key_cache.view(-1, num_kv_heads, head_dim)
    value_flat = (
        value_cache.view(-1, num_kv_heads, value_cache.shape[-1]) if value_cache.shape[-1] else None
    )
    query = q[plan.row].view(num_kv_heads, num_heads // num_kv_heads, head_dim)
    plain = params.softcap is None and params.sinks is None
    # One piece, or pieces that a cache in another dtype (--kv-cache-dtype) must convert
    # anyway: one tensor in position order and one SDPA call. The converting copies cost
    # what converting each piece would and the pieces' own matmuls and softmax are saved:
    # SmolLM2's shapes, one thread, bfloat16 cache, a view plus 16 gathered slots, us per
    # layer, 73 -> 67 at 300 keys and 399 -> 337 at 3,000 in isolation (one view: 49, 321);
    # inside the engine, a prompt found in the prefix cache then 200 tokens, 118 -> 111 at
    # 500 keys, 229 -> 224 at 1,500, 426 -> 393 at 3,000 (means of ~3,000 calls, ad hoc).
    # The pieces also give the very values one run of the same slots gives.
    # A cache in q's dtype keeps the pieces: copying its views costs more than they save
    # (float32 cache, the same plan: 60 -> 64 us at 300 keys, 113 -> 148 at 1,000).
    if plain and (_piece_count(plan) == 1 or key_flat.dtype != q.dtype):
        keys = _in_order(key_flat, plan, q.dtype)
        if value_flat is None:  # latent attention: values are the keys' first channels
            values = keys[..., : params.head_dim_v]
        else:
            values = _in_order(value_flat, plan, q.dtype)
        out = F.scaled_dot_product_attention(
            query.unsqueeze(0),
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            scale=params.scale,
        )
        return out.reshape(-1)
    keys = _pieces(key_flat, plan)
    if value_flat is None:
        values = [k[..., : params.head_dim_v] for k in keys]
    else:
        values = _pieces(value_flat, plan)
    if keys[0].dtype != q.dtype:  # soft-capping or sinks over a cache in another dtype
        keys = [k.to(q.dtype) for k in keys]
        values = [v.to(q.dtype) for v in values]
    return _pieces_attention(query, keys, values, params).reshape(-1)


def _piece_count(plan: InPlaceDecode) -> int:
    return len(plan.views) + (plan.gathered is not None)


def _in_order(flat: torch.Tensor, plan: InPlaceDecode, dtype: torch.dtype) -> torch.Tensor:
    """The attended slots of ``flat`` [slots, kv, D] as one [n, kv, D] tensor of ``dtype``,
    in position order: a view where the plan has one run and ``dtype`` is the cache's."""
    if _piece_count(plan) == 1:
        (piece,) = _pieces(flat, plan)
        return piece if piece.dtype == dtype else piece.to(dtype)
    out = torch.empty((plan.num_keys, *flat.shape[1:]), dtype=dtype, device=flat.device)
    for run, offset in zip(plan.views, plan.view_offsets, strict=True):
        out[offset : offset + run.length].copy_(flat[run.start : run.start + run.length])
    if plan.gathered is not None:
        assert plan.gathered_offsets is not None  # planned together (decode_plan.py)
        out.index_copy_(0, plan.gathered_offsets, _select(flat, plan.gathered).to(dtype))
    return out


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


def gathered_values(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    keys: torch.Tensor,
    table: torch.Tensor,
    batch: int,
    length: int,
    head_dim_v: int,
) -> torch.Tensor:
    """Gathered values, or (latent attention: an empty value cache) the keys' first
    ``head_dim_v`` channels."""
    if value_cache.shape[-1]:
        return gather_blocks(value_cache, table, batch, length)
    return keys[..., :head_dim_v]


def decode_keys_values(
    key_cache: torch.Tensor, value_cache: torch.Tensor, group: DecodeGroup, head_dim_v: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values [batch, kv_heads, context_len, D]: views of the cache for a lone
    sequence in one run of slots (two copies fewer per layer for a single stream; SDPA
    sees the same strides as over a gathered copy, so the same values), else gathered."""
    if group.run_start is None:
        keys = gather_blocks(key_cache, group.block_table, group.batch_size, group.context_len)
        values = gathered_values(
            key_cache,
            value_cache,
            keys,
            group.block_table,
            group.batch_size,
            group.context_len,
            head_dim_v,
        )
        return keys, values
    keys = _run_view(key_cache, group.run_start, group.context_len)
    if not value_cache.shape[-1]:
        return keys, keys[..., :head_dim_v]
    return keys, _run_view(value_cache, group.run_start, group.context_len)


def _run_view(cache: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Slots [start, start + length) of ``cache`` as [1, kv_heads, length, D], in place."""
    flat = cache.view(-1, cache.shape[2], cache.shape[3])
    return flat[start : start + length].transpose(0, 1).unsqueeze(0)


def gather_blocks(
    cache: torch.Tensor, table: torch.Tensor, batch: int, length: int
) -> torch.Tensor:
    """Blocks of ``table`` as [batch, kv_heads, length, D] (a strided view of one copy)."""
    num_kv_heads, head_dim = cache.shape[2], cache.shape[3]
    blocks = _select(cache, table).view(batch, -1, num_kv_heads, head_dim)
    return blocks[:, :length].transpose(1, 2)
