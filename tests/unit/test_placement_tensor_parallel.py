"""A rank of a tensor-parallel stage is sized by its share of the stage: its rows or
columns of each matrix, its vocabulary band, replicated KV heads and norms; checked
against what a loaded rank reports, and placement sizing a rank against its own budget."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import molink.pipeline.auto_place as auto_place
from molink.config import LayerRange
from molink.errors import InvalidParameterError
from molink.models.blocks.linear import DenseLinear
from molink.models.kv_cache import KVCache
from molink.models.parallel.group import ParallelGroup
from molink.models.parallel.layers import VocabParallelTable
from molink.placement.placement import ServedSpan
from molink.placement.resident import estimate_weights, held_as
from molink.quant.memory import resident_weight_bytes
from molink.transport.config import TransportConfig
from molink.weights.hf_dir import hf_dir_source
from tests.helpers.tiny_models import make_tiny_model

# Heads of 64 rows: a rank's share of q/k/v needs no padding of the int4 kernel's.
SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=4,
    vocab_size=384,
    num_attention_heads=2,
)
CPU = torch.device("cpu")
SPANS = (LayerRange(1, 3), LayerRange(0, 2), LayerRange(2, 4), LayerRange(0, 4))
GIB = 1 << 30


def _estimated_and_loaded(path: Path, quantization: str | None, size: int) -> None:
    source = hf_dir_source(path)
    held = held_as(source, quantization, torch.float32, CPU, tensor_parallel_size=size)
    estimate = estimate_weights(source, held)
    for span in SPANS:
        for rank in range(size):
            group = ParallelGroup(rank, size)
            model = source.load_slice(span, "float32", quantization=quantization, group=group)
            loaded = resident_weight_bytes(model)
            assert estimate.span_bytes(span.start, span.end) == pytest.approx(loaded, rel=0.01)


@pytest.mark.parametrize("quantization", [None, "int4"])
@pytest.mark.parametrize(
    "arch, kv_heads", [("llama", 2), ("llama", 1), ("llama_tied", 2), ("mixtral", 2)]
)
def test_a_rank_is_estimated_as_it_loads(
    tmp_path: Path, arch: str, kv_heads: int, quantization: str | None
) -> None:
    """One KV head for two ranks: each holds it whole (replicated), as vLLM does."""
    path = make_tiny_model(arch, tmp_path, num_key_value_heads=kv_heads, **SHAPE)
    _estimated_and_loaded(path, quantization, 2)


def test_a_rank_of_four_holds_about_a_quarter(tmp_path: Path) -> None:
    path = make_tiny_model("llama", tmp_path, **{**SHAPE, "num_attention_heads": 4})
    _estimated_and_loaded(path, None, 4)
    source = hf_dir_source(path)
    whole = estimate_weights(source, held_as(source, None, torch.float32, CPU))
    rank = estimate_weights(source, held_as(source, None, torch.float32, CPU, "int4", 4))
    assert rank.span_bytes(1, 3) < 0.3 * whole.span_bytes(1, 3)


def test_a_vocabulary_band_keeps_its_packed_copy_in_the_resident_figure(tmp_path: Path) -> None:
    """A rank's embedding and LM head bands each keep a oneDNN-packed copy on CPU float32,
    as its linear layers do: the resident figure counts them all."""
    source = hf_dir_source(make_tiny_model("llama", tmp_path, num_key_value_heads=2, **SHAPE))
    model = source.load_slice(LayerRange(0, 4), "float32", group=ParallelGroup(0, 2))
    assert isinstance(model.embed, VocabParallelTable) and model.embed.packed is not None
    assert isinstance(model.lm_head, VocabParallelTable) and model.lm_head.packed is not None
    plain = sum(p.numel() * p.element_size() for p in model.parameters())
    copies = [
        m.packed
        for m in model.modules()
        if isinstance(m, (DenseLinear, VocabParallelTable)) and m.packed is not None
    ]
    assert resident_weight_bytes(model) == plain + sum(c.numel() * c.element_size() for c in copies)


def _placed(monkeypatch: pytest.MonkeyPatch, path: Path, size: int, **budget: object) -> LayerRange:
    """A head serves layer 0; layers 1-3 are missing."""
    monkeypatch.setattr(
        auto_place, "_served_spans", lambda peer, transport: {"head": ServedSpan(0, 1)}
    )
    source = hf_dir_source(path)
    held = held_as(source, None, torch.float32, CPU, tensor_parallel_size=size)
    return auto_place.place(
        "10.0.0.1:5",
        source.model_config,
        torch.float32,
        16,
        transport=TransportConfig(),
        weights=estimate_weights(source, held),
        tensor_parallel_size=size,
        **budget,  # type: ignore[arg-type]
    )


def test_a_tensor_parallel_gpu_node_fits_each_rank_in_its_own_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each rank has its own device of this size: a rank holds half a layer's matrices, so
    the stage takes twice the layers of one device."""
    path = make_tiny_model("llama", tmp_path, num_key_value_heads=2, **SHAPE)
    source = hf_dir_source(path)
    whole = estimate_weights(source, held_as(source, None, torch.float32, CPU))
    kv = KVCache.bytes_per_block(source.model_config, 1, 16, torch.float32)
    per_layer = whole.span_bytes(1, 2) + kv * auto_place.MIN_KV_BLOCKS
    devices: list[torch.device] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        devices.append(device)
        return (per_layer * 3 // 2, per_layer * 3 // 2)

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    gpu = dict(max_memory=None, device=torch.device("cuda", 0), gpu_memory_utilization=1.0)
    one = _placed(monkeypatch, path, 1, **gpu)
    two = _placed(monkeypatch, path, 2, **gpu)
    assert (one.start, one.end) == (1, 2)
    assert (two.start, two.end) == (1, 3)
    assert torch.device("cuda", 1) in devices  # rank 1's device was asked, not only rank 0's
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(InvalidParameterError, match="tensor_parallel_size"):
        auto_place.memory_budget(None, torch.device("cuda", 0), 1.0, 2)


def test_the_given_memory_is_the_whole_nodes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--molink-max-memory covers all the ranks together (on a CPU they share the host's
    memory): two ranks, each holding about half, take as many layers as one."""
    path = make_tiny_model("llama", tmp_path, num_key_value_heads=2, **SHAPE)
    assert auto_place.memory_budget(3 * GIB, CPU, 0.9, 2) == 3 * GIB // 2
    monkeypatch.setattr(auto_place, "available_memory_bytes", lambda: 4 * GIB)
    assert auto_place.memory_budget(None, CPU, 0.9, 2) == 3 * GIB // 2
    budget = dict(max_memory=2_500_000, device=CPU)
    one = _placed(monkeypatch, path, 1, **budget)
    two = _placed(monkeypatch, path, 2, **budget)
    assert one == two
