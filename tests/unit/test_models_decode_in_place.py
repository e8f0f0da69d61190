"""Decode attention read in place (views of consecutive slots, short runs gathered) equals
the padded batched path and the paged reference: scattered and consecutive blocks, sliding
windows, soft-capping, sinks, latent attention, a cache in another dtype, batches mixing
prefills, short and long decodes."""

from __future__ import annotations

import pytest
import torch

from molink.kernels.paged_reference import DecodeParams, paged_decode_reference
from molink.models import decode_plan
from molink.models.attention import AttentionOptions, paged_attention
from molink.models.attention_metadata import AttentionMetadata, SeqChunk
from molink.models.decode_paths import decode_in_place
from molink.models.decode_plan import SlotRun, slot_runs

BLOCK = 4


@pytest.fixture(autouse=True)
def _small_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    # Tiny contexts take the in-place path, and runs of 2+ blocks are read as views.
    monkeypatch.setattr(decode_plan, "IN_PLACE_MIN_TOKENS", 10)
    monkeypatch.setattr(decode_plan, "MIN_VIEW_TOKENS", 8)


def test_runs_follow_consecutive_slots_and_windows() -> None:
    table = [3, 4, 5, 9, 1, 2]
    assert slot_runs(table, BLOCK, 0, 22) == [SlotRun(12, 12), SlotRun(36, 4), SlotRun(4, 6)]
    assert slot_runs(table, BLOCK, 14, 22) == [SlotRun(38, 2), SlotRun(4, 6)]
    plan = decode_plan.plan_in_place(0, table, 22, BLOCK, None, "cpu")
    assert plan.views == (SlotRun(12, 12),) and plan.gathered.tolist() == [
        36,
        37,
        38,
        39,
        4,
        5,
        6,
        7,
        8,
        9,
    ]
    assert plan.num_keys == 22


def _tables(lengths: list[int], consecutive: bool, seed: int) -> list[list[int]]:
    need = [-(-n // BLOCK) for n in lengths]
    ids = list(range(sum(need) + 4))
    if not consecutive:
        ids = torch.randperm(len(ids), generator=torch.Generator().manual_seed(seed)).tolist()
    tables, cursor = [], 0
    for n in need:
        tables.append(ids[cursor : cursor + n])
        cursor += n
    return tables


def _run(chunks, q, k, v, caches, options, window=None):
    meta = AttentionMetadata.build(chunks, BLOCK, sliding_window=window)
    key_cache, value_cache = (c.clone() for c in caches)
    return meta, paged_attention(q, k, v, key_cache, value_cache, meta, options)


@pytest.mark.parametrize("consecutive", [True, False])
@pytest.mark.parametrize(
    "window,options",
    [
        (None, AttentionOptions()),
        (7, AttentionOptions(scale=0.3)),
        (None, AttentionOptions(softcap=2.0)),
        (5, AttentionOptions(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0, -0.5]))),
    ],
)
def test_in_place_equals_the_batched_path(consecutive, window, options, monkeypatch) -> None:
    heads, kv_heads, dim = 6, 2, 8
    lengths = [30, 3, 17, 12, 25]  # decode lengths; index 1 is a prefill of 3 tokens
    tables = _tables(lengths, consecutive, seed=len(lengths))
    chunks = [
        SeqChunk(n - 1, 1, t) if i != 1 else SeqChunk(0, n, t)
        for i, (n, t) in enumerate(zip(lengths, tables, strict=True))
    ]
    rows = sum(c.num_tokens for c in chunks)
    gen = torch.Generator().manual_seed(1)
    num_blocks = sum(len(t) for t in tables) + 4
    caches = [torch.randn(num_blocks, BLOCK, kv_heads, dim, generator=gen) for _ in range(2)]
    q, k, v = (torch.randn(rows, h, dim, generator=gen) for h in (heads, kv_heads, kv_heads))
    meta, got = _run(chunks, q, k, v, caches, options, window)
    assert len(meta.in_place) == 4  # every decode of 10 tokens or more
    monkeypatch.setattr(decode_plan, "IN_PLACE_MIN_TOKENS", 10**9)
    batched_meta, expected = _run(chunks, q, k, v, caches, options, window)
    assert not batched_meta.in_place
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_latent_attention_and_a_bfloat16_cache_match_the_reference() -> None:
    heads, dim, dim_v = 4, 12, 8
    lengths = [23, 31]
    tables = _tables(lengths, consecutive=False, seed=3)
    gen = torch.Generator().manual_seed(2)
    num_blocks = sum(len(t) for t in tables) + 4
    keys = torch.randn(num_blocks, BLOCK, 1, dim, generator=gen).to(torch.bfloat16)
    values = torch.zeros(num_blocks, BLOCK, 1, 0, dtype=torch.bfloat16)
    chunks = [SeqChunk(n - 1, 1, t) for n, t in zip(lengths, tables, strict=True)]
    q = torch.randn(2, heads, dim, generator=gen)
    k = torch.randn(2, 1, dim, generator=gen)
    meta = AttentionMetadata.build(chunks, BLOCK)
    assert len(meta.in_place) == 2
    got = paged_attention(q, k, k[..., :dim_v], keys, values, meta)
    table = torch.tensor([t + [0] * (8 - len(t)) for t in tables])
    expected = paged_decode_reference(
        q,
        keys.float(),
        values.float(),
        table,
        torch.tensor(lengths),
        DecodeParams(dim**-0.5, dim_v),
    )
    torch.testing.assert_close(got.view(2, heads, dim_v), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_pieces_of_a_converted_cache_attend_exactly_as_one_run(cache_dtype) -> None:
    # A sequence whose first block came from the prefix cache (or whose blocks were
    # interleaved with other sequences') reads views and gathered slots; laid out again in
    # position order they must give the very values that one run of the same slots gives.
    heads, kv_heads, dim, length = 6, 2, 8, 28
    gen = torch.Generator().manual_seed(4)
    caches = [
        torch.randn(12, BLOCK, kv_heads, dim, generator=gen).to(cache_dtype) for _ in range(2)
    ]
    q = torch.randn(1, heads, dim, generator=gen)
    params = DecodeParams(dim**-0.5, dim)
    one_run = decode_plan.plan_in_place(0, list(range(1, 8)), length, BLOCK, None, "cpu")
    assert one_run.views == (SlotRun(4, length),) and one_run.gathered is None
    # The same slots planned as a gathered block, a view of three blocks, then four
    # gathered slots: the pieces interleave in position order.
    pieces = decode_plan.InPlaceDecode(
        0,
        (SlotRun(8, 12),),
        torch.tensor([4, 5, 6, 7, *range(20, 32)]),
        length,
        (4,),
        torch.tensor([0, 1, 2, 3, *range(16, 28)]),
    )
    expected = decode_in_place(q, *caches, one_run, params)
    assert torch.equal(decode_in_place(q, *caches, pieces, params), expected)
    reference = paged_decode_reference(
        q,
        caches[0].float(),
        caches[1].float(),
        torch.tensor([list(range(1, 8))]),
        torch.tensor([length]),
        params,
    )
    torch.testing.assert_close(expected.view(1, heads, dim), reference, atol=1e-5, rtol=1e-5)


def test_a_plan_places_every_piece_at_its_position() -> None:
    table = [3, 4, 5, 9, 1, 2]
    plan = decode_plan.plan_in_place(0, table, 22, BLOCK, None, "cpu")
    assert plan.view_offsets == (0,)
    assert plan.gathered_offsets.tolist() == list(range(12, 22))
    windowed = decode_plan.plan_in_place(0, [7, 3, 4, 5, 0], 20, BLOCK, 18, "cpu")
    # Positions 2..19: slots 30, 31 (block 7), then blocks 3, 4, 5 (one run), then block 0.
    assert windowed.views == (SlotRun(12, 12),) and windowed.view_offsets == (2,)
    assert windowed.gathered.tolist() == [30, 31, 0, 1, 2, 3]
    assert windowed.gathered_offsets.tolist() == [0, 1, 14, 15, 16, 17]
