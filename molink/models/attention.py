"""Paged attention over a flattened batch of sequence chunks.

Each layer stores its new keys and values in the paged cache, then attends every group that
``AttentionMetadata`` (molink/models/attention_metadata.py) planned for the step:

* the decode group in ONE batched call: through the Triton kernel on CUDA, else over its
  blocks gathered into a padded ``[B, L, kv_heads, head_dim]`` tensor with a padding mask;
  query heads are grouped by the key/value head they share, so grouped-query attention
  needs no repeated keys;
* long CPU decodes one by one, over views of their runs of slots (decode_plan.py);
* prefill groups one sequence at a time, causally, to the cached prefix and themselves. A
  chunk that starts at position 0 attends only to its own new keys, which skips reading
  the cache.

Soft-capped logits and attention sinks, which SDPA cannot express, go through ``_eager``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from molink.models.attention_metadata import AttentionMetadata, DecodeGroup, PrefillGroup
from molink.models.decode_paths import (
    as_bytes,
    decode_in_place,
    decode_keys_values,
    decode_params,
    decode_triton,
    gather_blocks,
    gathered_values,
)


@dataclass(frozen=True)
class AttentionOptions:
    """What differs between architectures' attention, past the shapes of q/k/v.

    ``scale``: the softmax scale (None: 1/sqrt(head_dim)); ``softcap``: logits pass through
    ``softcap * tanh(logits / softcap)`` (Gemma 2); ``sinks``: one learned logit per query
    head that joins the softmax and takes no value (GPT-OSS).
    """

    scale: float | None = None
    softcap: float | None = None
    sinks: torch.Tensor | None = None

    @property
    def eager(self) -> bool:
        return self.softcap is not None or self.sinks is not None


DEFAULT_OPTIONS = AttentionOptions()


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
) -> None:
    """Write ``k`` [T, kv_heads, Dk] and ``v`` [T, kv_heads, Dv] into their cache slots."""
    if meta.slot_run is not None and key_cache.dtype != torch.float8_e4m3fn:
        # Consecutive slots (a lone decode, one prompt's chunk): one copy into a slice,
        # which also casts to a cache in another dtype. An index copy needs the cast as a
        # call of its own: SmolLM2's shapes, one decode token, a bfloat16 cache, 6.6 ->
        # 3.7 us per layer (ad hoc, timeit).
        first, count = meta.slot_run
        key_cache.view(-1, k.shape[1], k.shape[2])[first : first + count].copy_(k)
        if value_cache.shape[-1]:
            value_cache.view(-1, v.shape[1], v.shape[2])[first : first + count].copy_(v)
        return
    # A cache in another dtype (--kv-cache-dtype bfloat16) is written with a cast; the
    # checks skip a no-op call per layer and step where it is not.
    if k.dtype != key_cache.dtype:
        k = k.to(key_cache.dtype)
    if v.dtype != value_cache.dtype:
        v = v.to(value_cache.dtype)
    if key_cache.dtype == torch.float8_e4m3fn:  # --kv-cache-dtype fp8: copied as bytes
        key_cache, value_cache, k, v = map(as_bytes, (key_cache, value_cache, k, v))
    key_cache.view(-1, k.shape[1], k.shape[2]).index_copy_(0, meta.slot_mapping, k)
    if value_cache.shape[-1]:
        value_cache.view(-1, v.shape[1], v.shape[2]).index_copy_(0, meta.slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    meta: AttentionMetadata,
    options: AttentionOptions = DEFAULT_OPTIONS,
) -> torch.Tensor:
    """Store ``k``/``v`` [T, kv_heads, D] in the cache, attend ``q`` [T, heads, D].

    Returns [T, heads * Dv] in row order. A value cache with a last dimension of 0 means
    values are the first Dv channels of the keys (multi-head latent attention caches one
    latent vector per token; see molink.models.blocks.mla).
    """
    store_kv(k, v, key_cache, value_cache, meta)
    head_dim_v = v.shape[-1]
    decode, prefills = meta.decode, meta.prefills
    if not prefills and not meta.in_place:
        assert decode is not None
        return _decode(q, key_cache, value_cache, decode, head_dim_v, options)
    if decode is None and len(prefills) == 1 and not meta.in_place:
        return _prefill(q, k, v, key_cache, value_cache, prefills[0], options)
    out = q.new_empty(q.shape[0], q.shape[1] * head_dim_v)
    if meta.in_place:
        params = decode_params(q, head_dim_v, meta.sliding_window, options)
        for plan in meta.in_place:
            out[plan.row] = decode_in_place(q, key_cache, value_cache, plan, params)
    if decode is not None:
        result = _decode(q, key_cache, value_cache, decode, head_dim_v, options)
        if isinstance(decode.rows, slice):
            out[decode.rows] = result
        else:
            out.index_copy_(0, decode.rows, result)
    for group in prefills:
        out[group.rows] = _prefill(q, k, v, key_cache, value_cache, group, options)
    return out


def _decode(
    q: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group: DecodeGroup,
    head_dim_v: int,
    options: AttentionOptions,
) -> torch.Tensor:
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = key_cache.shape[2]
    batch = group.batch_size
    if group.in_kernel:
        params = decode_params(q, head_dim_v, group.window, options)
        table = group.block_table.view(batch, -1)
        return decode_triton(q[group.rows], key_cache, value_cache, table, group.lengths, params)
    # Query heads sharing a kv head become that head's "query rows": [B, kv, group, D].
    query = q[group.rows].view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    keys, values = decode_keys_values(key_cache, value_cache, group, head_dim_v)
    keys, values = _as_dtype(keys, q.dtype), _as_dtype(values, q.dtype)
    if options.eager:
        mask = None if group.mask is None else group.mask.unsqueeze(1)
        out = _eager(query.unsqueeze(3), keys, values, mask, options)
    else:
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=group.mask, scale=options.scale
        )
    return out.reshape(batch, num_heads * head_dim_v)


def _as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)`` without the call where it would return ``x`` itself."""
    return x if x.dtype == dtype else x.to(dtype)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    group: PrefillGroup,
    options: AttentionOptions,
) -> torch.Tensor:
    num_heads, head_dim_v = q.shape[1], v.shape[2]
    num_kv_heads = k.shape[1]
    gqa = num_heads != num_kv_heads
    query = q[group.rows].transpose(0, 1).unsqueeze(0)
    mask = group.mask
    if group.block_table is None:
        keys = k[group.rows].transpose(0, 1).unsqueeze(0)
        values = v[group.rows].transpose(0, 1).unsqueeze(0)
    else:
        keys = _as_dtype(gather_blocks(key_cache, group.block_table, 1, group.context_len), q.dtype)
        values = gathered_values(
            key_cache, value_cache, keys, group.block_table, 1, group.context_len, head_dim_v
        )
        values = _as_dtype(values, q.dtype)
    if options.eager:
        if mask is None:
            n = query.shape[2]
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        groups = num_heads // num_kv_heads
        query = query.view(1, num_kv_heads, groups, -1, query.shape[-1])
        out = _eager(query, keys, values, mask, options).view(1, num_heads, -1, head_dim_v)
    elif mask is None:
        out = F.scaled_dot_product_attention(
            query, keys, values, is_causal=True, enable_gqa=gqa, scale=options.scale
        )
    else:
        out = F.scaled_dot_product_attention(
            query, keys, values, attn_mask=mask, enable_gqa=gqa, scale=options.scale
        )
    return out.squeeze(0).transpose(0, 1).reshape(-1, num_heads * head_dim_v)


def _eager(
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None,
    options: AttentionOptions,
) -> torch.Tensor:
    """Attention with soft-capped logits and/or sinks, which SDPA cannot express.

    query [B, kv, group, Tq, D], keys/values [B, kv, L, D]; ``mask`` broadcasts to
    [B, 1, 1, Tq, L]. Returns [B, kv, group, Tq, Dv].
    """
    scale = options.scale if options.scale is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, keys.unsqueeze(2).transpose(-1, -2)) * scale
    if options.softcap is not None:
        scores = torch.tanh(scores / options.softcap) * options.softcap
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if options.sinks is None:
        probs = torch.softmax(scores.float(), dim=-1).to(values.dtype)
    else:
        sinks = options.sinks.view(1, scores.shape[1], scores.shape[2], 1, 1)
        sinks = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
        combined = torch.cat((scores, sinks), dim=-1)
        # Subtracting the row maximum keeps exp() finite, as transformers does.
        combined = combined - combined.max(dim=-1, keepdim=True).values
        probs = torch.softmax(combined.float(), dim=-1)[..., :-1].to(values.dtype)
    return torch.matmul(probs, values.unsqueeze(2))
