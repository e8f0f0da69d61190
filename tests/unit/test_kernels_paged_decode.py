"""The Triton paged-decode kernel equals the PyTorch reference (run by Triton's interpreter
on the CPU): ragged batches, block boundaries, sliding windows, grouped-query ratios,
soft-capping, sinks, latent attention's shared key/value cache, half-precision caches."""

from __future__ import annotations

import dataclasses
import importlib.util
import os

import pytest
import torch

from molink.kernels.paged_reference import DecodeParams, paged_decode_reference

# MOLINK_TEST_DEVICE=cuda (bench/gpu_check.py) runs the compiled kernel on a GPU; elsewhere
# the interpreter runs it. It is chosen when a kernel is decorated: before the import.
DEVICE = torch.device(os.environ.get("MOLINK_TEST_DEVICE", "cpu"))
if DEVICE.type != "cuda":
    os.environ.setdefault("TRITON_INTERPRET", "1")
if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton)", allow_module_level=True)
from molink.kernels.triton_decode import paged_decode  # noqa: E402


def _case(
    lengths: list[int],
    heads: int,
    kv_heads: int,
    head_dim: int = 16,
    block_size: int = 4,
    head_dim_v: int | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """Random caches with each sequence's blocks scattered in a shuffled pool."""
    gen = torch.Generator().manual_seed(seed)
    need = [-(-n // block_size) for n in lengths]
    num_blocks = sum(need) + 3
    order = torch.randperm(num_blocks, generator=gen).tolist()
    table = torch.zeros(len(lengths), max(need), dtype=torch.int32)
    cursor = 0
    for row, n in enumerate(need):
        table[row, :n] = torch.tensor(order[cursor : cursor + n])
        cursor += n
    keys = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen).to(dtype)
    dv = head_dim if head_dim_v is None else 0
    values = torch.randn(num_blocks, block_size, kv_heads, dv, generator=gen).to(dtype)
    q = torch.randn(len(lengths), heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(lengths, dtype=torch.int32)
    return q, keys, values, table, lens


def _check(case, params: DecodeParams, atol: float = 1e-5) -> None:
    case = tuple(t.to(DEVICE) for t in case)
    if params.sinks is not None:
        params = dataclasses.replace(params, sinks=params.sinks.to(DEVICE))
    expected = paged_decode_reference(*case, params)
    got = paged_decode(*case, params)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    torch.testing.assert_close(got.float(), expected.float(), atol=atol, rtol=atol)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 2), (8, 1), (16, 1), (32, 2)])
def test_ragged_batches_across_block_boundaries(heads: int, kv_heads: int) -> None:
    lengths = [1, 4, 5, 8, 13, 31]  # one token, exactly one block, one past, ...
    case = _case(lengths, heads, kv_heads)
    _check(case, DecodeParams(scale=16**-0.5, head_dim_v=16))


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_block_sizes_that_are_not_the_padding(block_size: int) -> None:
    case = _case([2, 17, 40], 4, 2, head_dim=24, block_size=block_size)
    _check(case, DecodeParams(scale=0.2, head_dim_v=24))


@pytest.mark.parametrize("window", [1, 3, 4, 9, 100])
def test_sliding_windows(window: int) -> None:
    case = _case([1, 3, 6, 12, 23], 8, 2)
    _check(case, DecodeParams(scale=0.25, head_dim_v=16, window=window))


def test_soft_capped_logits_and_sinks() -> None:
    case = _case([5, 11, 16], 4, 2, seed=3)
    q = case[0] * 8  # large logits, where the cap bites
    case = (q, *case[1:])
    _check(case, DecodeParams(scale=0.25, head_dim_v=16, softcap=5.0))
    sinks = torch.tensor([0.5, -1.0, 3.0, 0.0])
    _check(case, DecodeParams(scale=0.25, head_dim_v=16, sinks=sinks, window=6))


def test_latent_attention_reads_values_from_the_keys() -> None:
    case = _case([3, 9, 20], 16, 1, head_dim=40, head_dim_v=32)
    _check(case, DecodeParams(scale=0.1, head_dim_v=32))


def test_half_precision_caches() -> None:
    case = _case([7, 19], 8, 2, dtype=torch.bfloat16)
    _check(case, DecodeParams(scale=0.25, head_dim_v=16), atol=2e-2)


@pytest.mark.parametrize("heads_per_program", [None, 16, 3, 1])
def test_a_group_split_over_several_programs(heads_per_program: int | None) -> None:
    """A key/value head's 16 query heads in shares, an uneven last one too (3): every
    share's heads, and only those, are written. 16 asks for the whole group, which blocks
    of 4 (no tensor-core dots) still split in shares of 8: the whole group through the
    reduction path computed wrong outputs on an H200."""
    case = _case([2, 9, 14], 32, 2, seed=5)
    params = DecodeParams(scale=0.25, head_dim_v=16)
    device_case = tuple(t.to(DEVICE) for t in case)
    expected = paged_decode_reference(*device_case, params)
    got = paged_decode(*device_case, params, heads_per_program=heads_per_program)
    torch.testing.assert_close(got.float(), expected.float(), atol=1e-5, rtol=1e-5)


def test_reductions_take_at_most_eight_heads_and_dots_the_whole_group() -> None:
    from molink.kernels.triton_decode import REDUCTION_HEADS_PER_PROGRAM, _heads_per_program

    assert REDUCTION_HEADS_PER_PROGRAM == 8
    assert _heads_per_program(16, 4, 16) == 8  # blocks of 4: no dots
    assert _heads_per_program(16, 16, 16) == 16  # dots: each key read once
    assert _heads_per_program(4, 16, 16) == 8  # a small group: capped, so taken whole
