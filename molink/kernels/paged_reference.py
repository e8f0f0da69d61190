"""Decode attention over a paged KV cache, written plainly in PyTorch.

This is the definition the fused kernels (molink/kernels/triton_decode.py) are tested
against: one new query token per sequence, keys and values read through the sequence's
row of the block table. It gathers each sequence's blocks, so it is for tests and for
devices without a kernel, not for speed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DecodeParams:
    """What differs between architectures' decode attention.

    ``window``: keys older than the last ``window`` positions are skipped (sliding window);
    ``softcap``: logits go through ``softcap * tanh(logits / softcap)``; ``sinks`` [heads]:
    one logit per query head that joins the softmax and weighs no value; ``head_dim_v``:
    with an empty value cache, values are the first ``head_dim_v`` channels of the keys
    (multi-head latent attention).
    """

    scale: float
    head_dim_v: int
    window: int | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None


def paged_decode_reference(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_lens: torch.Tensor,
    params: DecodeParams,
) -> torch.Tensor:
    """``q`` [B, H, D]; caches [blocks, block_size, kv_heads, D(v)]; ``block_table``
    [B, max_blocks]; ``context_lens`` [B] (the new token included, already stored).
    Returns [B, H, Dv] in ``q``'s dtype, computed in float32."""
    batch, num_heads, _ = q.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group = num_heads // num_kv_heads
    out = q.new_empty(batch, num_heads, params.head_dim_v)
    for b in range(batch):
        length = int(context_lens[b])
        blocks = block_table[b, : -(-length // block_size)].long()
        keys = key_cache[blocks].flatten(0, 1)[:length].float()  # [L, kv, D]
        if value_cache.shape[-1]:
            values = value_cache[blocks].flatten(0, 1)[:length].float()
        else:
            values = keys[..., : params.head_dim_v]
        query = q[b].float().view(num_kv_heads, group, -1)  # [kv, group, D]
        scores = torch.einsum("kgd,lkd->kgl", query, keys) * params.scale
        if params.softcap is not None:
            scores = torch.tanh(scores / params.softcap) * params.softcap
        if params.window is not None and length > params.window:
            scores[..., : length - params.window] = float("-inf")
        if params.sinks is not None:
            sinks = params.sinks.float().view(num_kv_heads, group, 1)
            probs = torch.softmax(torch.cat((scores, sinks), dim=-1), dim=-1)[..., :-1]
        else:
            probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("kgl,lkd->kgd", probs, values).reshape(num_heads, -1).to(q.dtype)
    return out
