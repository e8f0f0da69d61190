"""--kv-cache-dtype bfloat16: a float32 slice stores and reads its KV cache in bfloat16;
``auto`` gives it to weights quantized on a CPU."""

from __future__ import annotations

import torch

from molink.config import LayerRange
from molink.engine.factory import EngineOptions, build_local_engine, follower_settings
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


def test_weights_quantized_on_cpu_default_to_a_bfloat16_cache(tiny_model_dir) -> None:
    """``auto`` on a CPU whose weights go through the int4 kernel: a bfloat16 cache, twice
    the blocks of the float model's in the same memory; an explicit float32 stays."""
    model = str(tiny_model_dir("llama"))
    caches = {}
    for quantization, kv in ((None, "auto"), ("int4", "auto"), ("int4", "float32")):
        options = EngineOptions(
            model=model,
            kv_cache_memory_bytes=1 << 20,
            kv_cache_dtype=kv,
            quantization=quantization,
        )
        engine, _, _ = build_local_engine(options)
        (stage,) = engine.executor.stages
        caches[quantization, kv] = (stage.kv_cache.dtype, engine.scheduler.kv.num_total_blocks)
    assert caches[None, "auto"][0] == torch.float32
    assert caches["int4", "auto"][0] == torch.bfloat16
    assert caches["int4", "float32"][0] == torch.float32
    assert caches["int4", "auto"][1] == 2 * caches[None, "auto"][1]


def test_followers_get_the_cache_dtype_rank_zero_resolved() -> None:
    options = EngineOptions(model="/m", kv_cache_dtype="auto")
    layers = LayerRange(0, 4)
    quantized = follower_settings(options, layers, torch.float32, 8, torch.bfloat16)
    assert quantized.kv_cache_dtype == "bfloat16"
    own = follower_settings(options, layers, torch.float16, 8, torch.float16)
    assert own.kv_cache_dtype == "auto"  # the model's own dtype, which auto gives there too
    fp8 = follower_settings(options, layers, torch.bfloat16, 8, torch.float8_e4m3fn)
    assert fp8.kv_cache_dtype == "fp8"
