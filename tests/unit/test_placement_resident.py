"""Placement counts the bytes a node will hold per layer, in the form it holds them:
quantized planes, float copies, every expert, the embedding and the LM head where held;
checked against what loaded slices report, built from tiny checkpoints made here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import molink.pipeline.auto_place as auto_place
from molink.config import LayerRange
from molink.placement.placement import ServedSpan
from molink.placement.resident import estimate_weights, held_as
from molink.quant.memory import resident_weight_bytes
from molink.transport.config import TransportConfig
from molink.weights.gguf_source import GGUFSource
from molink.weights.hf_dir import hf_dir_source
from molink.weights.source import ModelSource
from tests.helpers.int4_checkpoints import make_int4_checkpoints
from tests.helpers.tiny_models import make_tiny_model
from tests.helpers.tiny_quant_gguf import write_quantized_llama_gguf

SHAPE = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=4, vocab_size=384)
CPU = torch.device("cpu")
SPANS = (LayerRange(1, 3), LayerRange(0, 2), LayerRange(2, 4), LayerRange(0, 4))


def _estimate_and_loaded(source: ModelSource, quantization: str | None, span: LayerRange):
    estimate = estimate_weights(source, held_as(source, quantization, torch.float32, CPU))
    model = source.load_slice(span, "float32", quantization=quantization)
    return estimate.span_bytes(span.start, span.end), resident_weight_bytes(model)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model("llama", tmp_path_factory.mktemp("llama"), **SHAPE)


@pytest.mark.parametrize("quantization", [None, "int4", "int8"])
@pytest.mark.parametrize("span", SPANS, ids=str)
def test_a_float_checkpoint_as_held(llama: Path, quantization: str | None, span) -> None:
    estimated, loaded = _estimate_and_loaded(hf_dir_source(llama), quantization, span)
    assert estimated == pytest.approx(loaded, rel=0.01)


@pytest.mark.parametrize("span", SPANS, ids=str)
def test_a_tied_head_is_held_once_by_a_slice_with_both_ends(tmp_path: Path, span) -> None:
    tied = hf_dir_source(make_tiny_model("llama_tied", tmp_path, **SHAPE))
    for quantization in (None, "int4"):
        estimated, loaded = _estimate_and_loaded(tied, quantization, span)
        assert estimated == pytest.approx(loaded, rel=0.01)


@pytest.mark.parametrize("method", ["awq", "gptq"])
def test_awq_and_gptq_checkpoints_as_held(llama: Path, tmp_path: Path, method: str) -> None:
    qdir, _ = make_int4_checkpoints(llama, tmp_path, method, 32)
    for span in SPANS:
        estimated, loaded = _estimate_and_loaded(hf_dir_source(qdir), None, span)
        assert estimated == pytest.approx(loaded, rel=0.01)


def test_a_quantized_gguf_as_held_quantized_or_dequantized(llama: Path, tmp_path: Path) -> None:
    source = GGUFSource(write_quantized_llama_gguf(llama, tmp_path / "q8.gguf"))
    for quantization in (None, "none"):
        for span in SPANS:
            estimated, loaded = _estimate_and_loaded(source, quantization, span)
            assert estimated == pytest.approx(loaded, rel=0.01)


def test_every_expert_of_a_moe_layer_is_counted(tmp_path: Path) -> None:
    source = hf_dir_source(make_tiny_model("mixtral", tmp_path, **SHAPE))
    for quantization in (None, "int4"):  # experts stay float either way
        for span in SPANS:
            estimated, loaded = _estimate_and_loaded(source, quantization, span)
            assert estimated == pytest.approx(loaded, rel=0.01)
    # The former estimate (attention + one gated MLP) left 3 of the 4 experts out.
    estimate = estimate_weights(source, held_as(source, None, torch.float32, CPU))
    assert estimate.span_bytes(1, 3) > 3 * 2 * (4 * 128 * 128 + 3 * 128 * 256) * 4


def test_a_node_takes_more_layers_of_a_4_bit_model_than_of_the_float_one(
    llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A head serves layer 0; the rest of the 4 layers are missing. With the same budget
    a node takes 1 float32 layer (its packed copy too), and all 3 of the AWQ model."""
    monkeypatch.setattr(
        auto_place, "_served_spans", lambda peer, transport: {"head": ServedSpan(0, 1)}
    )
    budget = 2_500_000

    def placed(source: ModelSource) -> LayerRange:
        weights = estimate_weights(source, held_as(source, None, torch.float32, CPU))
        config = source.model_config
        return auto_place.place(
            "10.0.0.1:5", config, torch.float32, 16, budget, TransportConfig(), weights
        )

    qdir, _ = make_int4_checkpoints(llama, tmp_path, "awq", 32)
    as_float, as_awq = placed(hf_dir_source(llama)), placed(hf_dir_source(qdir))
    assert (as_float.start, as_float.end) == (1, 2)
    assert (as_awq.start, as_awq.end) == (1, 4)
    # Each fits what the node holds (the LM head of the last layer included).
    awq = hf_dir_source(qdir).load_slice(as_awq, "float32")
    assert resident_weight_bytes(awq) < budget


def test_a_hub_model_is_sized_from_its_headers_without_downloading_a_shard(
    llama: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from huggingface_hub.utils import SafetensorsFileMetadata, SafetensorsRepoMetadata, TensorInfo
    from safetensors import safe_open

    from molink.weights import hub

    def download(repo: str, filename: str, revision: str | None) -> Path:
        if not (llama / filename).is_file():
            raise hub._NotOnHub(filename)
        return llama / filename

    with safe_open(str(llama / "model.safetensors"), framework="pt") as opened:
        infos = {
            n: TensorInfo("F32", opened.get_slice(n).get_shape(), (0, 0)) for n in opened.keys()
        }
    asked: list[str] = []

    def metadata(repo_id: str, revision: str | None = None) -> SafetensorsRepoMetadata:
        asked.append(repo_id)
        files = {"model.safetensors": SafetensorsFileMetadata({}, infos)}
        return SafetensorsRepoMetadata(
            None, False, dict.fromkeys(infos, "model.safetensors"), files
        )

    monkeypatch.setattr(huggingface_hub, "get_safetensors_metadata", metadata)
    source = hub.hub_source("org/tiny", download=download)
    held = held_as(source, "int4", torch.float32, CPU)
    local = hf_dir_source(llama)
    assert estimate_weights(source, held) == estimate_weights(local, held)
    assert asked == ["org/tiny"] and "model.safetensors" not in source.hub_files.requested


def test_a_span_too_large_for_packed_copies_may_hold_more_layers() -> None:
    """Past PREPACK_MAX_BYTES of matrices a float32 slice keeps no packed copies: 7B-sized
    layers (772 MiB) fit 3 with copies in 6 GiB, and 7 without them."""
    from molink.placement.resident import Held, WeightEstimate

    layer = 809_500_672
    weights = WeightEstimate((Held(layer, layer, layer),) * 32, Held(), Held(), packs=True)
    budget = 6 << 30
    assert weights.span_bytes(1, 4) == 6 * layer  # with copies
    assert weights.span_bytes(1, 7) == 6 * layer  # none: over 4 GiB of matrices
    assert weights.most_layers(budget, 32 << 20) == 7
