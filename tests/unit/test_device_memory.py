"""KV cache sizing from --gpu-memory-utilization after a profiled forward at the largest
batch, on the meta device with a stand-in for the CUDA allocator's counters."""

from __future__ import annotations

import pytest
import torch

from molink.engine import device_memory
from molink.engine.device_memory import ProfileLimits, dummy_chunks
from molink.engine.factory import EngineOptions, build_local_engine
from molink.errors import InvalidParameterError
from molink.models.kv_cache import KVCache

GIB = 1024**3
TOTAL, WEIGHTS, ACTIVATION, OUTSIDE = 8 * GIB, 3 * GIB, 1 * GIB, GIB // 2


class FakeMemory:
    """A device of 8 GiB: 3 GiB of weights loaded, a forward peaks 1 GiB above them,
    0.5 GiB held outside torch (the CUDA context)."""

    def __init__(self) -> None:
        self.forwards = 0

    def total_bytes(self) -> int:
        return TOTAL

    def free_bytes(self) -> int:
        return TOTAL - OUTSIDE - self.reserved_bytes()

    def allocated_bytes(self) -> int:
        return WEIGHTS

    def reserved_bytes(self) -> int:
        return WEIGHTS + ACTIVATION

    def reset_peak(self) -> None:
        self.forwards += 1

    def peak_bytes(self) -> int:
        return WEIGHTS + ACTIVATION


@pytest.fixture
def fake_memory(monkeypatch: pytest.MonkeyPatch) -> FakeMemory:
    memory = FakeMemory()
    monkeypatch.setattr(device_memory, "memory_probe", lambda device: memory)
    return memory


def _options(model: str, **overrides) -> EngineOptions:
    fields = dict(model=model, device="meta", max_num_seqs=8, max_num_batched_tokens=64)
    fields.update(overrides)
    return EngineOptions(**fields)


def test_dummy_batch_is_the_largest_the_scheduler_sends() -> None:
    chunks = dummy_chunks(ProfileLimits(0.9, 100, 8, 256, 16))
    assert len(chunks) == 8 and sum(c.num_tokens for c in chunks) == 100
    assert all(len(c.block_ids) == -(-c.num_tokens // 16) for c in chunks)
    assert len(dummy_chunks(ProfileLimits(0.9, 4, 8, 256, 16))) == 4  # one token each


def _per_block_and_scratch(source, max_num_seqs: int = 8) -> tuple[int, int]:
    """A block's bytes, and those of the profiling forward's own cache (not activations)."""
    config = source.model_config
    per_block = KVCache.bytes_per_block(config, config.num_layers, 16, torch.float32)
    chunks = dummy_chunks(ProfileLimits(0.9, 64, max_num_seqs, 256, 16))
    return per_block, sum(len(c.block_ids) for c in chunks) * per_block


def _utilization_for_blocks(source, blocks: int, max_num_seqs: int = 8) -> float:
    per_block, scratch = _per_block_and_scratch(source, max_num_seqs)
    return (WEIGHTS + ACTIVATION - scratch + OUTSIDE + (blocks + 0.5) * per_block) / TOTAL


def test_cache_takes_what_utilization_leaves(tiny_model_dir, fake_memory) -> None:
    engine, source, _ = build_local_engine(_options(str(tiny_model_dir("qwen3"))))
    assert fake_memory.forwards == 1  # one profiled forward for the one slice
    per_block, scratch = _per_block_and_scratch(source)
    budget = int(TOTAL * 0.9) - WEIGHTS - (ACTIVATION - scratch) - OUTSIDE
    stage = engine.executor.stages[0]
    assert stage.num_blocks == budget // per_block
    assert stage.kv_cache.device.type == "meta"


def test_what_does_not_fit_is_named(tiny_model_dir, fake_memory) -> None:
    model = str(tiny_model_dir("qwen3"))
    with pytest.raises(InvalidParameterError) as info:
        build_local_engine(_options(model, gpu_memory_utilization=0.5))
    assert info.value.field == "gpu_memory_utilization"
    assert "weights take 3.00 GiB" in info.value.message
    from molink.weights import resolve_model_source

    source = resolve_model_source(model)
    ten_blocks = _utilization_for_blocks(source, 10)  # 160 tokens
    with pytest.raises(InvalidParameterError) as info:
        build_local_engine(_options(model, gpu_memory_utilization=ten_blocks, max_model_len=200))
    assert info.value.field == "max_model_len" and "holds 160 tokens" in info.value.message
    ten_blocks = _utilization_for_blocks(source, 10, max_num_seqs=16)
    with pytest.raises(InvalidParameterError) as info:
        build_local_engine(
            _options(model, gpu_memory_utilization=ten_blocks, max_model_len=128, max_num_seqs=16)
        )
    assert info.value.field == "max_num_seqs" and "10 blocks fit" in info.value.message


def test_an_explicit_cache_size_skips_profiling(tiny_model_dir, fake_memory) -> None:
    engine, _, _ = build_local_engine(_options(str(tiny_model_dir("qwen3")), num_kv_blocks=32))
    assert fake_memory.forwards == 0 and engine.executor.stages[0].num_blocks == 32


def test_a_gpu_node_places_layers_by_its_device_memory(monkeypatch) -> None:
    from molink.pipeline import auto_place

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (6 * GIB, 10 * GIB))
    cuda = torch.device("cuda", 0)
    assert auto_place.memory_budget(None, cuda, 0.8) == 8 * GIB
    assert auto_place.memory_budget(3 * GIB, cuda, 0.8) == 3 * GIB  # --molink-max-memory wins
    monkeypatch.setattr(auto_place, "available_memory_bytes", lambda: 4 * GIB)
    assert auto_place.memory_budget(None, torch.device("cpu"), 0.8) == 3 * GIB
