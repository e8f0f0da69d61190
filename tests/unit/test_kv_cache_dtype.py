"""--kv-cache-dtype bfloat16: a float32 slice stores and reads its KV cache in bfloat16."""

from __future__ import annotations

import torch

from molink.config import LayerRange
from molink.engine.factory import EngineOptions, build_local_engine
from molink.models import KVCache, SeqChunk
from molink.weights import resolve_model_source
from tests.helpers.paged_runner import PagedRunner


def _logits(model, kv_dtype: torch.dtype) -> torch.Tensor:
    """Prefill, then decode steps with fixed tokens (both caches see the same tokens)."""
    runner = PagedRunner([model], num_blocks=8, block_size=4)
    runner.caches = [KVCache.allocate(model.config, model.num_local_layers, 8, 4, kv_dtype)]
    prompts, blocks = [[5, 9, 33, 70, 2, 11], [8, 8, 100]], [[0, 1, 2, 3], [4, 5, 6, 7]]
    first = [SeqChunk(0, len(p), b) for p, b in zip(prompts, blocks, strict=True)]
    rows = [runner.forward(first, [t for p in prompts for t in p])]
    for step in range(6):
        chunks = [SeqChunk(len(p) + step, 1, b) for p, b in zip(prompts, blocks, strict=True)]
        rows.append(runner.forward(chunks, [40 + step, 50 + step]))
    return model.compute_logits(torch.cat(rows))


def test_bfloat16_cache_tracks_float32(tiny_model_dir) -> None:
    source = resolve_model_source(str(tiny_model_dir("qwen3")))
    model = source.load_slice(LayerRange(0, source.model_config.num_layers), "float32")
    exact, halved = _logits(model, torch.float32), _logits(model, torch.bfloat16)
    assert (exact - halved).abs().max() <= 0.02 * exact.abs().max()
    assert (exact.argmax(-1) == halved.argmax(-1)).float().mean() >= 0.9


def test_engine_with_bfloat16_cache_holds_twice_the_blocks(tiny_model_dir) -> None:
    model = str(tiny_model_dir("llama"))
    sizes = {}
    for kv in ("auto", "bfloat16"):
        options = EngineOptions(model=model, kv_cache_memory_bytes=1 << 20, kv_cache_dtype=kv)
        engine, _, _ = build_local_engine(options)
        sizes[kv] = engine.scheduler.kv.num_total_blocks
    assert sizes["bfloat16"] == 2 * sizes["auto"]


def test_float8_cache_tracks_float32(tiny_model_dir) -> None:
    """--kv-cache-dtype fp8 (allocated on a GPU) stores keys and values as float8_e4m3fn
    bytes: written, gathered (two sequences), read in place (one) and cast back, here on
    the CPU, which has the same tensor paths (the GPU's decode kernel loads them as float)."""
    source = resolve_model_source(str(tiny_model_dir("qwen3")))
    model = source.load_slice(LayerRange(0, source.model_config.num_layers), "float32")
    exact, fp8 = _logits(model, torch.float32), _logits(model, torch.float8_e4m3fn)
    # 3 mantissa bits: each stored key and value within 2**-4 of itself.
    assert (exact - fp8).abs().max() <= 0.1 * exact.abs().max()
    assert (exact.argmax(-1) == fp8.argmax(-1)).float().mean() >= 0.8
    runner = PagedRunner([model], num_blocks=8, block_size=4)
    runner.caches = [
        KVCache.allocate(model.config, model.num_local_layers, 8, 4, torch.float8_e4m3fn)
    ]
    lone = [runner.forward([SeqChunk(0, 5, [2, 3])], [5, 9, 33, 70, 2])]
    lone += [runner.forward([SeqChunk(5 + i, 1, [2, 3])], [40 + i]) for i in range(3)]
    runner.caches = [KVCache.allocate(model.config, model.num_local_layers, 8, 4, torch.float32)]
    full = [runner.forward([SeqChunk(0, 5, [2, 3])], [5, 9, 33, 70, 2])]
    full += [runner.forward([SeqChunk(5 + i, 1, [2, 3])], [40 + i]) for i in range(3)]
    got, expected = model.compute_logits(torch.cat(lone)), model.compute_logits(torch.cat(full))
    assert (got - expected).abs().max() <= 0.1 * expected.abs().max()
