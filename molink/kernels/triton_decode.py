"""Decode attention that reads the paged KV cache in place, as a Triton kernel.

Why Triton: it is the kernel language vLLM and SGLang use for their portable attention
backends, it ships as a wheel next to torch, and its interpreter (``TRITON_INTERPRET=1``)
runs the same kernel on a CPU, so CI checks it against molink/kernels/paged_reference.py
without a GPU. (flashinfer-python needs a CUDA toolkit at import; torch's flex_attention
needs a block mask rebuilt per step.)

One program per (sequence, key/value head, share of its query heads): it walks the
sequence's row of the block table, loads each block's keys and values where they lie, and
keeps an online softmax (running maximum, running sum, rescaled accumulator) for the query
heads it takes of those that share that key/value head, so grouped-query attention reads
each key once per share (one share where the products are tensor-core dots). Sliding
windows skip the blocks before the window; soft-capping and attention sinks are applied
inside the loop and at its end. With an empty value cache, values are the keys' first
channels (latent attention).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from molink.kernels.paged_reference import DecodeParams


@triton.jit
def _tanh(x):
    # tanh through exp: the same in every Triton version and in the interpreter.
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    table_ptr,
    lens_ptr,
    sinks_ptr,
    out_ptr,
    stride_qb,
    stride_qh,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_tb,
    stride_ob,
    stride_oh,
    scale,
    softcap,
    window,
    GROUP: tl.constexpr,
    HEADS: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    DV_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_PAD: tl.constexpr,
    USE_SOFTCAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    USE_SINKS: tl.constexpr,
    USE_DOT: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    length = tl.load(lens_ptr + seq)
    g = tl.program_id(2) * HEADS + tl.arange(0, GROUP_PAD)  # this program's query heads
    d = tl.arange(0, D_PAD)
    dv = tl.arange(0, DV_PAD)
    s = tl.arange(0, BLOCK_PAD)
    heads = kv_head * GROUP + g
    head_ok = (g < GROUP) & (tl.arange(0, GROUP_PAD) < HEADS)
    q = tl.load(
        q_ptr + seq * stride_qb + heads[:, None] * stride_qh + d[None, :],
        mask=head_ok[:, None] & (d[None, :] < HEAD_DIM),
        other=0.0,
    ).to(tl.float32)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    total = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DV_PAD], tl.float32)
    start = 0
    if USE_WINDOW:
        start = tl.maximum(length - window, 0)
    for j in range(start // BLOCK_SIZE, tl.cdiv(length, BLOCK_SIZE)):
        block = tl.load(table_ptr + seq * stride_tb + j).to(tl.int64)
        pos = j * BLOCK_SIZE + s
        valid = (s < BLOCK_SIZE) & (pos < length) & (pos >= start)
        k = tl.load(
            k_ptr + block * stride_kb + s[:, None] * stride_ks + kv_head * stride_kh + d[None, :],
            mask=valid[:, None] & (d[None, :] < HEAD_DIM),
            other=0.0,
        ).to(tl.float32)
        # "ieee": full float32 products (the default would round inputs to TF32 on CUDA).
        if USE_DOT:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee") * scale
        else:
            scores = tl.sum(q[:, None, :] * k[None, :, :], axis=2) * scale
        if USE_SOFTCAP:
            scores = softcap * _tanh(scores / softcap)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        total = total * alpha + tl.sum(p, axis=1)
        v = tl.load(
            v_ptr + block * stride_vb + s[:, None] * stride_vs + kv_head * stride_vh + dv[None, :],
            mask=valid[:, None] & (dv[None, :] < HEAD_DIM_V),
            other=0.0,
        ).to(tl.float32)
        if USE_DOT:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    if USE_SINKS:
        sink = tl.load(sinks_ptr + heads, mask=head_ok, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, sink)
        alpha = tl.exp(m - m_new)
        total = total * alpha + tl.exp(sink - m_new)
        acc = acc * alpha[:, None]
    out = acc / total[:, None]
    tl.store(
        out_ptr + seq * stride_ob + heads[:, None] * stride_oh + dv[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=head_ok[:, None] & (dv[None, :] < HEAD_DIM_V),
    )


# Query heads one program takes where its products are reductions rather than tensor-core
# dots. Measured on an H200 (Triton 3.6, CUDA 13): with 16 query heads per program the
# reduction path returned outputs up to 2.7 away from the reference (float32 caches,
# blocks of 4), while 8, 4 and 2 heads per program matched it to 1e-6; the interpreter on a
# CPU matched at every width. The dot path matched at 16 and 32 heads.
REDUCTION_HEADS_PER_PROGRAM = 8


def _pad(n: int) -> int:
    return max(triton.next_power_of_2(n), 1)


def _uses_dot(group_pad: int, block_pad: int, d_pad: int) -> bool:
    """Tensor-core products need every side >= 16; smaller groups use a reduction."""
    return group_pad >= 16 and block_pad >= 16 and d_pad >= 16


def _heads_per_program(group: int, block_pad: int, d_pad: int) -> int:
    """The whole group where it multiplies through dots (keys read once per key/value
    head); at most REDUCTION_HEADS_PER_PROGRAM where it reduces."""
    if _uses_dot(_pad(group), block_pad, d_pad):
        return group
    return REDUCTION_HEADS_PER_PROGRAM


def paged_decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    params: DecodeParams,
    heads_per_program: int | None = None,
) -> torch.Tensor:
    """The same contract as ``paged_decode_reference``: ``q`` [B, H, D], caches
    [blocks, block_size, kv_heads, D(v)] (last dims contiguous), ``block_table``
    [B, max_blocks], ``context_lens`` [B]; returns [B, H, Dv] in ``q``'s dtype.

    ``heads_per_program``: at most this many query heads of one key/value head per program
    (None: as ``_heads_per_program`` picks); a larger group is split over several
    programs, each reading the keys once."""
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    block_pad, d_pad = _pad(block_size), _pad(head_dim)
    # A caller may split a group further, never past what the path it lands on computes.
    heads = min(group, heads_per_program or group, _heads_per_program(group, block_pad, d_pad))
    values = value_cache if value_cache.shape[-1] else key_cache
    out = q.new_empty(batch, num_heads, params.head_dim_v)
    if batch == 0:
        return out
    group_pad = _pad(heads)
    sinks = params.sinks if params.sinks is not None else context_lens  # unread placeholder
    _paged_decode_kernel[(batch, num_kv_heads, triton.cdiv(group, heads))](
        q,
        key_cache,
        values,
        block_table,
        context_lens,
        sinks,
        out,
        q.stride(0),
        q.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        key_cache.stride(2),
        values.stride(0),
        values.stride(1),
        values.stride(2),
        block_table.stride(0),
        out.stride(0),
        out.stride(1),
        params.scale,
        params.softcap or 1.0,
        params.window or 0,
        GROUP=group,
        HEADS=heads,
        GROUP_PAD=group_pad,
        HEAD_DIM=head_dim,
        D_PAD=d_pad,
        HEAD_DIM_V=params.head_dim_v,
        DV_PAD=_pad(params.head_dim_v),
        BLOCK_SIZE=block_size,
        BLOCK_PAD=block_pad,
        USE_SOFTCAP=params.softcap is not None,
        USE_WINDOW=params.window is not None,
        USE_SINKS=params.sinks is not None,
        USE_DOT=_uses_dot(group_pad, block_pad, d_pad),
    )
    return out
