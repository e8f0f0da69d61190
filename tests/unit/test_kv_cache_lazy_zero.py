"""A CPU KV cache of a MiB or more lies in an anonymous mapping: zeros that become resident
only where blocks are written."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from molink.models.kv_cache import LAZY_ZERO_MIN_BYTES, KVCache, zeroed


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS"))


def test_a_large_cache_reads_zero_and_is_resident_only_where_written() -> None:
    before = _rss_kib()
    cache = zeroed((4, 2, 512, 16, 4, 64), torch.bfloat16, "cpu")  # 32 MiB
    assert cache.shape == (4, 2, 512, 16, 4, 64) and cache.dtype == torch.bfloat16
    assert cache.is_contiguous() and cache.data_ptr() % 4096 == 0
    assert _rss_kib() - before < 8 * 1024  # not 32 MiB: no page written yet
    assert not cache[3, 1, 511].any() and not cache[0, 0, 0].any()
    cache[0, 0, :8] = 1.5  # 8 blocks of one layer's keys: 64 KiB
    grown = _rss_kib() - before
    assert grown < 8 * 1024
    assert float(cache[0, 0, 7].float().sum()) == 1.5 * 16 * 4 * 64
    del cache
    gc.collect()


def test_small_caches_other_dtypes_and_devices() -> None:
    small = zeroed((2, 8, 4), torch.float32, "cpu")
    assert small.numel() * 4 < LAZY_ZERO_MIN_BYTES and not small.any()
    fp8 = zeroed((1 << 20, 2), torch.float8_e4m3fn, "cpu")  # 2 MiB of float8 bytes
    assert fp8.dtype == torch.float8_e4m3fn and not fp8.view(torch.uint8).any()
    fp8.view(torch.uint8)[5, 1] = 7
    assert int(fp8.view(torch.uint8).sum()) == 7


def test_a_cpu_cache_larger_than_the_available_memory_is_refused_at_start(
    tiny_model_dir, monkeypatch
) -> None:
    """Its pages would only be found missing once sequences filled them."""
    from molink.config import LayerRange
    from molink.errors import InvalidParameterError
    from molink.stage import resources
    from molink.stage.worker import StageWorker
    from molink.weights import resolve_model_source

    source = resolve_model_source(str(tiny_model_dir("llama")))
    config = source.model_config
    layers = LayerRange(0, config.num_layers)
    model = source.load_slice(layers, "float32")
    per_block = KVCache.bytes_per_block(config, config.num_layers, 4, torch.float32)
    free = resources.DeviceMemory(total_bytes=1 << 40, free_bytes=per_block * 100)
    monkeypatch.setattr(resources, "host_memory", lambda: free)
    assert StageWorker(model, config, layers, 100, 4, torch.float32).kv_cache.num_blocks == 100
    with pytest.raises(InvalidParameterError, match="kv_cache_memory.*do not fit"):
        StageWorker(model, config, layers, 101, 4, torch.float32)
