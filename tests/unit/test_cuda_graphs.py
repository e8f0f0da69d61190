"""Decode steps replayed from graphs captured per batch-size bucket equal eager steps.

On a CPU the graphs are stand-ins that re-run the recorded forward on the static buffers,
which checks buckets, padding rows, buffer copies and output slicing; with
MOLINK_TEST_DEVICE=cuda (bench/gpu_check.py) the same test captures real CUDA graphs.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import pytest
import torch

from molink.config import LayerRange
from molink.models.attention_metadata import AttentionMetadata, SeqChunk
from molink.models.kv_cache import KVCache
from molink.stage.decode_graphs import CudaGraphFactory, DecodeGraphs, bucket_sizes, pick_bucket
from molink.weights import resolve_model_source

DEVICE = torch.device(os.environ.get("MOLINK_TEST_DEVICE", "cpu"))
BLOCK = 4


class _Replay:
    def __init__(self) -> None:
        self.fn: Callable[[], None] | None = None

    def replay(self) -> None:
        assert self.fn is not None
        self.fn()


class ReplayFactory:
    """Captures by running once and remembering the callable; replay runs it again."""

    def __init__(self) -> None:
        self.captured = 0

    def new(self) -> _Replay:
        return _Replay()

    def capture(self, graph: _Replay, fn: Callable[[], None]) -> None:
        fn()
        graph.fn = fn
        self.captured += 1


def test_bucket_sizes_and_choice() -> None:
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(3) == [1, 2, 3]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 24]
    sizes = bucket_sizes(256)
    assert sizes[:5] == [1, 2, 4, 8, 16] and sizes[-1] == 256 and len(sizes) == 35
    assert pick_bucket(sizes, 3) == 4 and pick_bucket(sizes, 17) == 24
    assert pick_bucket(sizes, 257) is None


def _factory():
    return CudaGraphFactory(DEVICE) if DEVICE.type == "cuda" else ReplayFactory()


@pytest.mark.parametrize("arch", ["qwen3", "gemma2"])  # gemma2: windows and soft-capping
def test_replayed_decode_steps_equal_eager_ones(tiny_model_dir, arch) -> None:
    source = resolve_model_source(str(tiny_model_dir(arch)))
    config = source.model_config
    layers = LayerRange(0, config.num_layers)
    model = source.load_slice(layers, "float32", device=DEVICE)
    caches = [
        KVCache.allocate(config, config.num_layers, 80, BLOCK, torch.float32, DEVICE)
        for _ in range(2)
    ]
    factory = _factory()
    graphs = DecodeGraphs(model, caches[1], max_batch=8, max_model_len=64, factory=factory)
    assert graphs.sizes == [1, 2, 4, 8]
    gen = torch.Generator().manual_seed(0)
    tables = [list(range(8 * s, 8 * s + 8)) for s in range(9)]
    lengths = [3 + 2 * s for s in range(9)]
    prefill = [SeqChunk(0, n, t) for n, t in zip(lengths, tables, strict=True)]
    prompt = torch.randint(3, config.vocab_size, (sum(lengths),), generator=gen).to(DEVICE)
    for cache in caches:
        model(prompt, AttentionMetadata.build(prefill, BLOCK, device=DEVICE, kernel=True), cache)
    for step, batch in enumerate([1, 3, 5, 8, 2, 9]):
        seqs = list(range(batch))
        chunks = [SeqChunk(lengths[s], 1, tables[s]) for s in seqs]
        tokens = torch.randint(3, config.vocab_size, (batch,), generator=gen).to(DEVICE)
        meta = AttentionMetadata.build(chunks, BLOCK, device=DEVICE, kernel=True)
        eager = model(tokens, meta, caches[0])
        if batch > 8:
            assert not graphs.can_run(meta)  # above the largest bucket: eager
            replayed = model(tokens, meta, caches[1])
        else:
            assert graphs.can_run(meta)
            replayed = graphs.run(tokens, meta)
        torch.testing.assert_close(replayed, eager, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        for s in seqs:
            lengths[s] += 1
    pairs = zip(caches[0].keys + caches[0].values, caches[1].keys + caches[1].values, strict=True)
    for a, b in pairs:
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    if isinstance(factory, ReplayFactory):
        assert factory.captured == 4


def test_prefill_steps_are_not_replayed(tiny_model_dir) -> None:
    source = resolve_model_source(str(tiny_model_dir("qwen3")))
    config = source.model_config
    model = source.load_slice(LayerRange(0, config.num_layers), "float32", device=DEVICE)
    cache = KVCache.allocate(config, config.num_layers, 16, BLOCK, torch.float32, DEVICE)
    graphs = DecodeGraphs(model, cache, max_batch=2, max_model_len=32, factory=_factory())
    meta = AttentionMetadata.build([SeqChunk(0, 3, [0])], BLOCK, device=DEVICE, kernel=True)
    assert not graphs.can_run(meta)
    long = AttentionMetadata.build([SeqChunk(40, 1, list(range(11)))], BLOCK, kernel=True)
    assert not graphs.can_run(long)  # past the captured context length
