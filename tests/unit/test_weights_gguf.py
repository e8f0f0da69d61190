"""GGUF files: config from metadata, name mapping, Q/K un-permutation, errors, the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from molink.config import LayerRange
from molink.errors import UnsupportedArchitectureError, WeightLoadError
from molink.models import SeqChunk
from molink.models.archs.llama import reverse_permute
from molink.models.rope import base_inv_freq, llama3_inv_freq
from molink.weights import resolve_model_source
from molink.weights.cache import MARKER_FILE, build_entry
from molink.weights.gguf_config import llama3_from_freq_factors
from molink.weights.gguf_convert import cached_gguf_as_hf_dir
from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tiny_gguf import permute, write_tiny_gguf
from tests.helpers.tiny_models import load_reference_model

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def gguf_files(tiny_model_dir, tmp_path_factory):
    built: dict[str, Path] = {}

    def make(arch: str, **kwargs) -> Path:
        key = arch + repr(sorted(kwargs.items()))
        if key not in built:
            out = tmp_path_factory.mktemp("gguf") / f"tiny-{arch}.gguf"
            built[key] = write_tiny_gguf(tiny_model_dir(arch), out, **kwargs)
        return built[key]

    return make


def _logits(model, token_ids: list[int]) -> torch.Tensor:
    runner = PagedRunner([model], 16, 4)
    hidden = runner.forward([SeqChunk(0, len(token_ids), list(range(8)))], token_ids)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("arch", ["llama", "llama_tied", "qwen2", "qwen3", "gemma2"])
def test_gguf_model_matches_the_original_checkpoint(tiny_model_dir, gguf_files, arch) -> None:
    hf_dir = tiny_model_dir(arch)
    source = resolve_model_source(str(gguf_files(arch)))
    original = resolve_model_source(str(hf_dir)).model_config
    config = source.model_config
    for field in (
        "architecture",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "vocab_size",
        "tie_word_embeddings",
        "attention_bias",
        "rope_theta",
    ):
        assert getattr(config, field) == getattr(original, field), field
    assert config.rms_norm_eps == pytest.approx(original.rms_norm_eps)
    assert source.name == f"tiny-{arch}"
    model = source.load_slice(LayerRange(0, config.num_layers), "float32")
    tokens = list(range(5, 29))
    with torch.no_grad():
        expected = load_reference_model(hf_dir)(torch.tensor([tokens])).logits[0]
    assert (_logits(model, tokens) - expected).abs().max().item() <= TOLERANCE


def test_reverse_permute_undoes_llama_cpp_layout() -> None:
    weights = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    assert np.array_equal(reverse_permute(permute(weights, 8), 8), weights)


def test_gguf_slice_dequantizes_only_its_tensors(gguf_files) -> None:
    source = resolve_model_source(str(gguf_files("llama")))
    source.load_slice(LayerRange(1, 3), "float32")
    read = source.last_store.read_names
    assert {int(n.split(".")[2]) for n in read} == {1, 2}
    assert all(n.startswith("model.layers.") for n in read)


def test_quantized_tensors_are_dequantized(tiny_model_dir, gguf_files) -> None:
    import gguf

    name = "blk.0.ffn_up.weight"
    path = gguf_files("qwen2", quantize=(name,))
    source = resolve_model_source(str(path))
    model = source.load_slice(LayerRange(0, 1), "float32", quantization="none")
    original = resolve_model_source(str(tiny_model_dir("qwen2"))).load_slice(LayerRange(0, 1))
    qtype = gguf.GGMLQuantizationType.Q8_0
    up = original.layers[0].mlp.gate_up.weight[128:].numpy()
    expected = gguf.quants.dequantize(gguf.quants.quantize(up, qtype), qtype)
    assert np.array_equal(model.layers[0].mlp.gate_up.weight[128:].numpy(), expected)
    assert not np.array_equal(expected, up)  # really quantized


def test_gguf_missing_tensor_is_named(gguf_files) -> None:
    path = gguf_files("llama", drop=("blk.2.attn_v.weight",))
    source = resolve_model_source(str(path))
    source.load_slice(LayerRange(3, 4), "float32")
    with pytest.raises(WeightLoadError, match=r"model\.layers\.2\.self_attn\.v_proj\.weight"):
        source.load_slice(LayerRange(2, 3), "float32")


def test_truncated_gguf_is_named(gguf_files, tmp_path: Path) -> None:
    data = gguf_files("llama").read_bytes()
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(data[: len(data) - 5000])
    with pytest.raises(WeightLoadError, match="broken.gguf"):
        resolve_model_source(str(broken))


def test_unsupported_gguf_architecture(gguf_files) -> None:
    path = gguf_files("qwen2", arch_override="gpt2")
    with pytest.raises(UnsupportedArchitectureError, match="gguf:gpt2"):
        resolve_model_source(str(path))


def test_llama3_scaling_is_recognised_from_rope_freqs() -> None:
    cfg = {"rope_theta": 500000.0, "head_dim": 64}
    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    base = base_inv_freq(500000.0, 64)
    factors = (base / llama3_inv_freq(base, scaling)).numpy()
    assert llama3_from_freq_factors(factors, cfg) == scaling
    with pytest.raises(WeightLoadError, match="rope_freqs"):
        llama3_from_freq_factors(factors * 1.5, cfg)


def test_gguf_tokenizer_is_exported_with_chat_template(
    gguf_files, tiny_model_dir, monkeypatch, tmp_path
) -> None:
    from transformers import AutoTokenizer

    monkeypatch.setenv("MOLINK_CACHE_DIR", str(tmp_path))
    source = resolve_model_source(str(gguf_files("qwen3")))
    config = json.loads((source.tokenizer_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    ours = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    original = AutoTokenizer.from_pretrained(str(tiny_model_dir("qwen3")))
    text = "Hello world! What is the capital of France?"
    assert ours(text).input_ids == original(text).input_ids


def test_conversion_cache_is_built_once_and_loads(gguf_files, tmp_path: Path, monkeypatch) -> None:
    path = gguf_files("llama_tied")
    entry = cached_gguf_as_hf_dir(path, tmp_path)
    assert (entry / MARKER_FILE).is_file()
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in entry.iterdir()
    }

    def fail(*args, **kwargs):
        raise AssertionError("converted twice")

    monkeypatch.setattr("molink.weights.gguf_convert.convert_gguf_to_hf_dir", fail)
    assert cached_gguf_as_hf_dir(path, tmp_path) == entry
    converted = resolve_model_source(str(entry))
    direct = resolve_model_source(str(path))
    rng = LayerRange(0, direct.model_config.num_layers)
    a, b = converted.load_slice(rng, "float32"), direct.load_slice(rng, "float32")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_cache_entry_written_by_another_process_wins(tmp_path: Path) -> None:
    entry = tmp_path / "models" / "m"

    def build(tmp: Path) -> None:
        (tmp / "payload").write_text("mine")
        # Another process finishes first while this one is still building.
        entry.mkdir(parents=True)
        (entry / "payload").write_text("theirs")
        (entry / MARKER_FILE).write_text("{}")

    assert build_entry(entry, build, {}) == entry
    assert (entry / "payload").read_text() == "theirs"
    assert [p.name for p in entry.parent.iterdir()] == ["m"]  # no temp dirs left


def test_failed_build_leaves_no_entry(tmp_path: Path) -> None:
    entry = tmp_path / "m"

    def build(tmp: Path) -> None:
        (tmp / "half").write_text("x")
        raise WeightLoadError("boom")

    with pytest.raises(WeightLoadError):
        build_entry(entry, build, {})
    assert list(tmp_path.iterdir()) == []


def _is_mapped(path: Path) -> bool:
    return any(
        line.endswith(str(path)) for line in Path("/proc/self/maps").read_text().splitlines()
    )


def test_the_file_is_released_once_slices_and_tokenizer_are_read(
    gguf_files, monkeypatch, tmp_path: Path
) -> None:
    # The reader maps the whole file and holds its parsed metadata; an engine asks for the
    # tokenizer after loading its slices, so from then on neither stays resident.
    import gc
    import shutil

    monkeypatch.setenv("MOLINK_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "model.gguf"
    shutil.copy(gguf_files("qwen3"), path)
    source = resolve_model_source(str(path))
    num_layers = source.model_config.num_layers
    whole = source.load_slice(LayerRange(0, num_layers), "float32")
    assert _is_mapped(path)
    assert source.tokenizer_dir.is_dir()
    gc.collect()
    assert "_reader" not in source.__dict__ and not _is_mapped(path)
    again = source.load_slice(LayerRange(0, num_layers), "float32")  # the file is reopened
    tokens = [3, 1, 4, 1, 5]
    logits = [PagedRunner([m], 16, 4) for m in (whole, again)]
    hidden = [r.forward([SeqChunk(0, len(tokens), list(range(8)))], tokens) for r in logits]
    assert torch.equal(whole.compute_logits(hidden[0]), again.compute_logits(hidden[1]))


_CONVERT = """
import sys
from molink.weights.gguf_source import GGUFSource
folder = GGUFSource(sys.argv[1]).tokenizer_dir
print((folder / "tokenizer.json").is_file(), "transformers" in sys.modules)
"""


def test_the_tokenizer_is_converted_without_importing_transformers_here(
    gguf_files, tmp_path: Path
) -> None:
    # transformers' modules would stay resident in the server (~90 MiB): a child converts.
    import os
    import subprocess
    import sys

    env = {**os.environ, "MOLINK_CACHE_DIR": str(tmp_path)}
    out = subprocess.run(
        [sys.executable, "-c", _CONVERT, str(gguf_files("qwen3"))],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout
    assert out.split() == ["True", "False"]


def test_a_tokenizer_the_child_cannot_convert_is_named(tmp_path: Path) -> None:
    from molink.weights.tokenizer_child import export_in_child

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(64))
    with pytest.raises(WeightLoadError, match="bad.gguf"):
        export_in_child(bad, tmp_path / "out")
