"""A quantized GGUF slice is cached on disk as the int4 kernel reads it and restored from there."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from molink.config import LayerRange
from molink.models import SeqChunk
from molink.quant.linear import QuantLinear
from molink.weights import packed_cache
from molink.weights.aligned_safetensors import aligned
from molink.weights.gguf_source import GGUFSource
from molink.weights.packed_cache import METADATA_FILE, packed_entry_for
from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tiny_gguf import write_tiny_gguf

pytest.importorskip("gguf")
QUANTIZED = ("ffn_up", "ffn_gate", "ffn_down", "attn_q", "attn_k", "attn_v", "attn_output")


@pytest.fixture
def quantized_gguf(tiny_model_dir, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MOLINK_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir = tiny_model_dir("llama")
    layers = json.loads((hf_dir / "config.json").read_text())["num_hidden_layers"]
    names = [f"blk.{i}.{part}.weight" for i in range(layers) for part in QUANTIZED]
    return write_tiny_gguf(hf_dir, tmp_path / "tiny-q8.gguf", quantize=names)


def _logits(slices, tokens: list[int]) -> torch.Tensor:
    runner = PagedRunner(slices, 16, 4)
    hidden = runner.forward([SeqChunk(0, len(tokens), list(range(8)))], tokens)
    return slices[-1].compute_logits(hidden)


def test_second_start_reads_the_cache_not_the_file(quantized_gguf: Path) -> None:
    first = GGUFSource(quantized_gguf)
    layers = LayerRange(0, first.model_config.num_layers)
    loaded = first.load_slice(layers, "float32", quantization="gguf")
    entry = packed_entry_for(quantized_gguf)
    assert (entry / METADATA_FILE).is_file() and (entry / "layer-00000.safetensors").is_file()

    again = GGUFSource(quantized_gguf)
    restored = again.load_slice(layers, "float32", quantization="gguf")
    assert "_reader" not in again.__dict__  # neither metadata nor tensors parsed from the file
    assert again.last_store is None
    assert again.model_config == first.model_config
    tokens = [1, 5, 9, 3, 7, 2]
    assert torch.equal(_logits([restored], tokens), _logits([loaded], tokens))
    quantized = [m for m in restored.modules() if isinstance(m, QuantLinear) and m.planes]
    assert quantized and all(m.source_type == "Q8_0" for m in quantized)


def test_cache_holds_no_float_copy_of_quantized_matrices(quantized_gguf: Path) -> None:
    source = GGUFSource(quantized_gguf)
    source.load_slice(LayerRange(0, source.model_config.num_layers), "float32")
    with safe_open(str(packed_entry_for(quantized_gguf) / "layer-00000.safetensors"), "pt") as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}  # noqa: SIM118
    matrices = {k: d for k, d in dtypes.items() if "plane" in k or "scale_zero" in k}
    assert matrices and set(matrices.values()) <= {"U8", "BF16"}
    floats = [k for k, d in dtypes.items() if d == "F32"]
    assert all("norm" in k for k in floats), floats  # only the layer norms are float32


def test_restored_kernel_tensors_are_aligned_views_of_the_files(
    quantized_gguf: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What the int4 kernel reads sits on 64-byte boundaries in the mapped part files, so
    restoring copies nothing (molink.weights.aligned_safetensors)."""
    source = GGUFSource(quantized_gguf)
    layers = LayerRange(0, source.model_config.num_layers)
    source.load_slice(layers, "float32", quantization="gguf")
    with safe_open(str(packed_entry_for(quantized_gguf) / "layer-00000.safetensors"), "pt") as f:
        starts = {key: f.get_tensor(key).data_ptr() % 64 for key in f.keys()}  # noqa: SIM118
    assert starts and set(starts.values()) == {0}, starts

    copied: list[str] = []

    def recording(tensor: torch.Tensor) -> torch.Tensor:
        kept = aligned(tensor)
        if kept is not tensor:
            copied.append(str(tuple(tensor.shape)))
        return kept

    monkeypatch.setattr(packed_cache, "aligned", recording)
    restored = GGUFSource(quantized_gguf).load_slice(layers, "float32", quantization="gguf")
    assert copied == []  # every tensor restored as a view of its file
    planes = [m.planes for m in restored.modules() if isinstance(m, QuantLinear) and m.planes]
    # What the kernel is called on: the joined matrix of two planes, or each plane alone.
    tensors = [t for p in planes for t in (p.joined or (*p.packed, p.scale_zero))]
    assert tensors and all(t.data_ptr() % 64 == 0 for t in tensors)


def test_slices_restore_from_a_whole_model_cache(quantized_gguf: Path) -> None:
    source = GGUFSource(quantized_gguf)
    num_layers = source.model_config.num_layers
    whole = source.load_slice(LayerRange(0, num_layers), "float32")
    again = GGUFSource(quantized_gguf)
    parts = [again.load_slice(r, "float32") for r in (LayerRange(0, 1), LayerRange(1, num_layers))]
    assert again.last_store is None
    tokens = [4, 8, 15, 16, 23]
    assert torch.equal(_logits(parts, tokens), _logits([whole], tokens))


def test_a_missing_part_is_read_from_the_file_and_added(quantized_gguf: Path) -> None:
    source = GGUFSource(quantized_gguf)
    source.load_slice(LayerRange(0, 1), "float32")
    entry = packed_entry_for(quantized_gguf)
    assert not (entry / "layer-00001.safetensors").is_file()
    num_layers = source.model_config.num_layers
    source.load_slice(LayerRange(1, num_layers), "float32")
    assert source.last_store is not None and (entry / "layer-00001.safetensors").is_file()


def test_float_weights_are_not_cached(quantized_gguf: Path) -> None:
    source = GGUFSource(quantized_gguf)
    source.load_slice(LayerRange(0, 1), "float32", quantization="none")
    assert not (packed_entry_for(quantized_gguf) / "layer-00000.safetensors").exists()


def test_a_start_in_another_dtype_gets_its_own_float_weights(
    quantized_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The norms (and other float tensors) of a part are cached in the dtype the slice ran
    in: a float32 start after a bfloat16 one must not get them rounded to bfloat16."""
    num_layers = GGUFSource(quantized_gguf).model_config.num_layers
    layers = LayerRange(0, num_layers)
    GGUFSource(quantized_gguf).load_slice(layers, "bfloat16", quantization="gguf")
    after_bf16 = GGUFSource(quantized_gguf).load_slice(layers, "float32", quantization="gguf")
    monkeypatch.setenv("MOLINK_CACHE_DIR", str(tmp_path / "fresh-cache"))
    from_file = GGUFSource(quantized_gguf).load_slice(layers, "float32", quantization="gguf")
    expected = from_file.state_dict()
    for name, tensor in after_bf16.state_dict().items():
        assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
    # Each dtype's parts are then restored from the cache, not read from the file again.
    for dtype in ("bfloat16", "float32"):
        monkeypatch.setenv("MOLINK_CACHE_DIR", str(tmp_path / "cache"))
        again = GGUFSource(quantized_gguf)
        again.load_slice(layers, dtype, quantization="gguf")
        assert again.last_store is None, dtype


def _q2_k_blocks(rows: int, cols: int) -> np.ndarray:
    """Valid Q2_K blocks (84 bytes per 256 weights): random integers and sub-scales under
    small float16 super-block scales."""
    rng = np.random.default_rng(3)
    blocks = rng.integers(0, 256, (rows * cols // 256, 84), dtype=np.uint8)
    blocks[:, 80:82] = np.full(len(blocks), 1e-3, np.float16).view(np.uint8).reshape(-1, 2)
    blocks[:, 82:84] = np.full(len(blocks), 5e-4, np.float16).view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def test_matrices_of_a_type_that_cannot_stay_quantized_are_named(
    tiny_model_dir,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A Q2_K matrix (a type the int4 kernel does not take) in a quantized stage is held as
    float32: the load says so, naming the type, instead of inflating it silently."""
    monkeypatch.setenv("MOLINK_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir = tiny_model_dir("llama", hidden_size=256, intermediate_size=512)
    config = json.loads((hf_dir / "config.json").read_text())
    blocks = _q2_k_blocks(config["intermediate_size"], config["hidden_size"])
    path = write_tiny_gguf(
        hf_dir,
        tmp_path / "tiny-q2k.gguf",
        quantize=["blk.0.attn_q.weight"],
        raw_blocks={"blk.0.ffn_up.weight": ("Q2_K", blocks)},
    )
    source = GGUFSource(path)
    with caplog.at_level(logging.WARNING, logger="molink.weights.gguf_source"):
        model = source.load_slice(LayerRange(0, 1), "float32", quantization="gguf")
    up = model.layers[0].mlp.gate_up
    assert isinstance(up, QuantLinear) and up.planes is None  # gate (F32) + up (Q2_K): float
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Q2_K" in w and "float32" in w for w in warnings), warnings


def test_an_unreadable_part_is_read_from_the_file_again(quantized_gguf: Path) -> None:
    """A part file cut short (a full disk, a copy interrupted) or overwritten with other
    bytes is not trusted: the slice is read from the GGUF file and the part rewritten."""
    source = GGUFSource(quantized_gguf)
    layers = LayerRange(0, source.model_config.num_layers)
    loaded = source.load_slice(layers, "float32", quantization="gguf")
    part = packed_entry_for(quantized_gguf) / "layer-00000.safetensors"
    part.write_bytes(part.read_bytes()[:100])
    again = GGUFSource(quantized_gguf)
    restored = again.load_slice(layers, "float32", quantization="gguf")
    assert again.last_store is not None  # read from the file
    tokens = [1, 5, 9, 3, 7, 2]
    assert torch.equal(_logits([restored], tokens), _logits([loaded], tokens))
    third = GGUFSource(quantized_gguf)
    third.load_slice(layers, "float32", quantization="gguf")
    assert third.last_store is None  # the rewritten part is read from the cache


def test_unreadable_cached_metadata_is_parsed_from_the_file_again(quantized_gguf: Path) -> None:
    first = GGUFSource(quantized_gguf)
    (packed_entry_for(quantized_gguf) / METADATA_FILE).write_text('{"config": {"hidden')
    again = GGUFSource(quantized_gguf)
    assert again.model_config == first.model_config
