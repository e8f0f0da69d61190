"""Paged attention over a flattened batch of sequence chunks.

A forward step carries, for every scheduled sequence, a chunk of new tokens. Rows of the
flattened batch follow the order of the chunks. ``AttentionMetadata.build`` turns the chunks
into the index tensors every layer needs, once per forward:

* decode chunks (one new token) read the cache in place where they can: on CUDA through
  the Triton kernel for the whole batch; on a CPU, sequences of at least
  ``IN_PLACE_MIN_TOKENS`` one by one over views of their runs of slots (decode_plan.py).
  Shorter ones are attended in ONE batched call: their blocks are gathered into a padded
  ``[B, L, kv_heads, head_dim]`` tensor with a padding mask; query heads are grouped by
  the key/value head they share, so grouped-query attention needs no repeated keys;
* prefill chunks (several new tokens) are attended one sequence at a time, causally, to
  the cached prefix and themselves. A chunk that starts at position 0 attends only to its
  own new keys, which skips reading the cache.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from molink.errors import InvalidParameterError
from molink.models import decode_plan
from molink.models.decode_paths import (
    as_bytes,
    decode_in_place,
    decode_keys_values,
    decode_params,
    decode_triton,
    gather_blocks,
    gathered_values,
    use_triton,
)
from molink.models.decode_plan import InPlaceDecode, plan_in_place


@dataclass(frozen=True)
class SeqChunk:
    start_pos: int  # tokens of this sequence already in the KV cache
    num_tokens: int  # new tokens of this sequence in this forward
    block_ids: Sequence[int]  # the sequence's whole block table (covers start_pos + num_tokens)


@dataclass(frozen=True)
class DecodeGroup:
    """Every single-token chunk of the batch, attended together."""

    rows: slice | torch.Tensor  # their rows in the flattened batch
    batch_size: int
    block_table: torch.Tensor  # [batch_size * blocks_per_seq], padded with block 0
    context_len: int  # longest context; gathered keys are cut to it
    mask: torch.Tensor | None  # [batch_size, 1, 1, context_len] bool; None: no padding
    lengths: torch.Tensor  # [batch_size] int32 context lengths, for kernels reading in place
    window: int | None = None
    in_kernel: bool = False  # True: a kernel reads the blocks in place (no gather, no mask)
    # A lone sequence whose blocks follow one another: its keys are slots
    # [run_start, run_start + context_len) of the cache, read in place (no gather).
    run_start: int | None = None


@dataclass(frozen=True)
class PrefillGroup:
    """One multi-token chunk of one sequence."""

    rows: slice
    block_table: torch.Tensor | None  # blocks covering the context; None: own keys only
    context_len: int
    mask: torch.Tensor | None  # [num_tokens, context_len] bool; None: plain causal


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _check_chunk(index: int, chunk: SeqChunk, block_size: int) -> None:
    if chunk.start_pos < 0 or chunk.num_tokens < 1:
        raise InvalidParameterError(
            "chunks",
            f"chunk {index}: start_pos must be >= 0 and num_tokens >= 1, "
            f"got start_pos={chunk.start_pos}, num_tokens={chunk.num_tokens}",
        )
    needed = _cdiv(chunk.start_pos + chunk.num_tokens, block_size)
    if len(chunk.block_ids) < needed:
        raise InvalidParameterError(
            "block_ids",
            f"chunk {index}: {chunk.start_pos + chunk.num_tokens} tokens need {needed} blocks "
            f"of {block_size}, but the block table has {len(chunk.block_ids)}",
        )


class AttentionMetadata:
    """Index tensors of one forward, shared by every layer of a stage.

    ``positions`` [T] and ``slot_mapping`` [T] (``block_id * block_size + offset``) cover
    every new token in chunk order.
    """

    def __init__(
        self,
        chunks: tuple[SeqChunk, ...],
        block_size: int,
        positions: torch.Tensor,
        slot_mapping: torch.Tensor,
        decode: DecodeGroup | None,
        prefills: tuple[PrefillGroup, ...],
        sliding_window: int | None,
        in_place: tuple[InPlaceDecode, ...] = (),
    ) -> None:
        self.chunks = chunks
        self.block_size = block_size
        self.positions = positions
        self.slot_mapping = slot_mapping
        self.decode = decode
        self.prefills = prefills
        self.in_place = in_place
        self.sliding_window = sliding_window
        self.num_tokens = int(positions.shape[0])
        self.max_context_len = max(c.start_pos + c.num_tokens for c in chunks)

    @classmethod
    def build(
        cls,
        chunks: Sequence[SeqChunk],
        block_size: int,
        *,
        device: torch.device | str = "cpu",
        sliding_window: int | None = None,
        kernel: bool | None = None,
    ) -> AttentionMetadata:
        """Precompute everything attention needs for ``chunks`` (rows in chunk order).

        ``sliding_window``: each token attends only to the last ``sliding_window`` positions
        (itself included), as Mistral does. Models apply their own window; callers leave it.
        ``kernel``: decodes read the cache through the paged-decode kernel (None: where
        Triton runs, i.e. on CUDA).
        """
        chunks = tuple(chunks)
        if not chunks:
            raise InvalidParameterError("chunks", "a forward needs at least one chunk")
        if block_size < 1:
            raise InvalidParameterError("block_size", "must be >= 1")
        positions: list[int] = []
        slots: list[int] = []
        decode_rows: list[int] = []
        decode_chunks: list[SeqChunk] = []
        prefills: list[PrefillGroup] = []
        in_place: list[InPlaceDecode] = []
        kernel = use_triton(torch.device(device)) if kernel is None else kernel
        for index, chunk in enumerate(chunks):
            _check_chunk(index, chunk, block_size)
            row = len(positions)
            end = chunk.start_pos + chunk.num_tokens
            block_ids = chunk.block_ids
            positions.extend(range(chunk.start_pos, end))
            slots.extend(
                block_ids[p // block_size] * block_size + p % block_size
                for p in range(chunk.start_pos, end)
            )
            if chunk.num_tokens == 1 and not kernel and end >= decode_plan.IN_PLACE_MIN_TOKENS:
                in_place.append(
                    plan_in_place(row, block_ids, end, block_size, sliding_window, device)
                )
            elif chunk.num_tokens == 1:
                decode_rows.append(row)
                decode_chunks.append(chunk)
            else:
                prefills.append(_prefill_group(row, chunk, block_size, device, sliding_window))
        decode = (
            _decode_group(decode_rows, decode_chunks, block_size, device, sliding_window, kernel)
            if decode_chunks
            else None
        )
        return cls(
            chunks,
            block_size,
            torch.tensor(positions, dtype=torch.long, device=device),
            torch.tensor(slots, dtype=torch.long, device=device),
            decode,
            tuple(prefills),
            sliding_window,
            tuple(in_place),
        )

    def with_sliding_window(self, window: int) -> AttentionMetadata:
        """The same batch with every token's attention limited to the last ``window`` positions."""
        decode = self.decode
        if decode is not None and decode.in_kernel and not self.prefills and not self.in_place:
            # The kernel applies the window itself: same tensors, so a captured CUDA graph
            # (molink/stage/decode_graphs.py) keeps reading the buffers it was captured on.
            return AttentionMetadata(
                self.chunks,
                self.block_size,
                self.positions,
                self.slot_mapping,
                dataclasses.replace(decode, window=window),
                (),
                window,
            )
        return AttentionMetadata.build(
            self.chunks,
            self.block_size,
            device=self.positions.device,
            sliding_window=window,
            kernel=decode.in_kernel if decode is not None else None,
        )


def _decode_group(
    rows: list[int],
    chunks: list[SeqChunk],
    block_size: int,
    device: torch.device | str,
    window: int | None,
    kernel: bool = False,
) -> DecodeGroup:
    lengths = [c.start_pos + 1 for c in chunks]
    context_len = max(lengths)
    blocks_per_seq = _cdiv(context_len, block_size)
    table: list[int] = []
    for chunk, length in zip(chunks, lengths, strict=True):
        used = _cdiv(length, block_size)
        table.extend(chunk.block_ids[:used])
        table.extend([0] * (blocks_per_seq - used))
    mask = None
    needs_window = window is not None and context_len > window
    if not kernel and (needs_window or min(lengths) != context_len):
        lens = torch.tensor(lengths, dtype=torch.long, device=device)[:, None]
        key_pos = torch.arange(context_len, device=device)[None, :]
        mask = key_pos < lens
        if needs_window:
            mask &= key_pos >= lens - window
        mask = mask.view(len(chunks), 1, 1, context_len)
    first = rows[0]
    contiguous = rows == list(range(first, first + len(rows)))
    run_start = None
    if len(chunks) == 1 and mask is None and not kernel:
        run_start = _one_run(table, block_size)
    return DecodeGroup(
        rows=(
            slice(first, first + len(rows))
            if contiguous
            else torch.tensor(rows, dtype=torch.long, device=device)
        ),
        batch_size=len(chunks),
        block_table=torch.tensor(table, dtype=torch.long, device=device),
        context_len=context_len,
        mask=mask,
        lengths=torch.tensor(lengths, dtype=torch.int32, device=device),
        window=window,
        in_kernel=kernel,
        run_start=run_start,
    )


def _one_run(block_ids: list[int], block_size: int) -> int | None:
    """The first slot of ``block_ids`` if they follow one another (one run of slots)."""
    first = block_ids[0]
    if block_ids != list(range(first, first + len(block_ids))):
        return None
    return first * block_size


def _prefill_group(
    row: int,
    chunk: SeqChunk,
    block_size: int,
    device: torch.device | str,
    window: int | None,
) -> PrefillGroup:
    n = chunk.num_tokens
    context_len = chunk.start_pos + n
    rows = slice(row, row + n)
    if chunk.start_pos == 0 and (window is None or n <= window):
        return PrefillGroup(rows, None, context_len, None)
    used = _cdiv(context_len, block_size)
    table = torch.tensor(list(chunk.block_ids[:used]), dtype=torch.long, device=device)
    query_pos = torch.arange(chunk.start_pos, context_len, device=device)[:, None]
    key_pos = torch.arange(context_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return PrefillGroup(rows, table, context_len, mask)


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
