"""A lone decoding sequence whose blocks follow one another is attended over views of the
cache (no gather), bit for bit as over the gathered copy; other batches keep gathering."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from molink.models.attention import AttentionOptions, paged_attention
from molink.models.attention_metadata import AttentionMetadata, SeqChunk

BLOCK, KV_HEADS, HEADS, HEAD_DIM = 4, 2, 6, 16


def _attend(meta: AttentionMetadata, value_dim: int, dtype: torch.dtype, options=None):
    gen = torch.Generator().manual_seed(meta.num_tokens)
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(meta.num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(meta.num_tokens, KV_HEADS, value_dim, generator=gen)
    key_cache = torch.randn(40, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    value_cache = torch.randn(40, BLOCK, KV_HEADS, value_dim, generator=gen).to(dtype)
    out = paged_attention(q, k, v, key_cache, value_cache, meta, options or AttentionOptions())
    return out, key_cache


@pytest.mark.parametrize("length", [1, 3, 4, 5, 17, 60])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # --kv-cache-dtype
@pytest.mark.parametrize("value_dim", [HEAD_DIM, 0])  # 0: latent attention, values in keys
def test_lone_run_is_read_in_place_bit_for_bit(length: int, dtype, value_dim: int) -> None:
    blocks = list(range(7, 7 + -(-length // BLOCK)))
    meta = AttentionMetadata.build([SeqChunk(length - 1, 1, blocks)], BLOCK)
    assert meta.decode is not None and meta.decode.run_start == 7 * BLOCK
    gathered = AttentionMetadata.build([SeqChunk(length - 1, 1, blocks)], BLOCK)
    gathered.decode = dataclasses.replace(gathered.decode, run_start=None)
    if value_dim == 0:
        in_place, cache = _attend_latent(meta, dtype, HEAD_DIM // 2)
        expected, expected_cache = _attend_latent(gathered, dtype, HEAD_DIM // 2)
    else:
        in_place, cache = _attend(meta, value_dim, dtype)
        expected, expected_cache = _attend(gathered, value_dim, dtype)
    assert torch.equal(in_place, expected) and torch.equal(cache, expected_cache)
    softcapped = AttentionOptions(softcap=5.0)
    assert torch.equal(
        _attend(meta, HEAD_DIM, dtype, softcapped)[0],
        _attend(gathered, HEAD_DIM, dtype, softcapped)[0],
    )


def _attend_latent(meta: AttentionMetadata, dtype: torch.dtype, dim: int):
    """Values are the keys' first ``dim`` channels (an empty value cache)."""
    gen = torch.Generator().manual_seed(meta.num_tokens + 1)
    q = torch.randn(meta.num_tokens, HEADS, HEAD_DIM, generator=gen)
    k = torch.randn(meta.num_tokens, KV_HEADS, HEAD_DIM, generator=gen)
    v = torch.randn(meta.num_tokens, KV_HEADS, dim, generator=gen)
    key_cache = torch.randn(40, BLOCK, KV_HEADS, HEAD_DIM, generator=gen).to(dtype)
    value_cache = torch.empty(40, BLOCK, KV_HEADS, 0, dtype=dtype)
    return paged_attention(q, k, v, key_cache, value_cache, meta), key_cache


def test_other_batches_keep_gathering() -> None:
    scattered = AttentionMetadata.build([SeqChunk(9, 1, [3, 5, 4])], BLOCK)
    two = AttentionMetadata.build([SeqChunk(9, 1, [3, 4, 5]), SeqChunk(2, 1, [9])], BLOCK)
    windowed = AttentionMetadata.build([SeqChunk(9, 1, [3, 4, 5])], BLOCK, sliding_window=4)
    kernel = AttentionMetadata.build([SeqChunk(9, 1, [3, 4, 5])], BLOCK, kernel=True)
    for meta in (scattered, two, windowed, kernel):
        assert meta.decode is not None and meta.decode.run_start is None
    # Only the blocks the context uses count: a later, unused block may lie elsewhere.
    spare = AttentionMetadata.build([SeqChunk(9, 1, [3, 4, 5, 30])], BLOCK)
    assert spare.decode is not None and spare.decode.run_start == 3 * BLOCK
