"""The quantized device check runs end to end on a CPU at tiny sizes (--smoke), on a GGUF
cut to its first layers by bench/gguf_first_layers.py (which must keep it loadable)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from bench import quant_gpu_check
from bench.gguf_first_layers import write_first_layers
from molink.weights import default_model_gguf, resolve_model_source


@pytest.fixture(scope="module")
def two_layer_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("gguf") / "first-two.gguf"
    return write_first_layers(default_model_gguf(), target, 2)


def test_first_layers_keep_metadata_and_quantized_tensors(two_layer_gguf: Path) -> None:
    source, cut = gguf.GGUFReader(default_model_gguf()), gguf.GGUFReader(two_layer_gguf)
    assert int(cut.fields["llama.block_count"].contents()) == 2
    kept = {t.name: t for t in cut.tensors}
    assert not any(name.startswith("blk.2.") for name in kept)
    for tensor in source.tensors:
        if tensor.name in kept:  # byte for byte, in its own quantized type
            assert kept[tensor.name].tensor_type == tensor.tensor_type
            assert bytes(kept[tensor.name].data) == bytes(tensor.data)
    assert "token_embd.weight" in kept and "blk.1.ffn_down.weight" in kept
    assert cut.fields["tokenizer.ggml.tokens"].contents() == (
        source.fields["tokenizer.ggml.tokens"].contents()
    )
    assert (
        resolve_model_source(str(two_layer_gguf), quantization="gguf").model_config.num_layers == 2
    )


def test_first_layers_refuses_more_than_the_file_has(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="layers: 31 must be in \\[1, 30\\]"):
        write_first_layers(default_model_gguf(), tmp_path / "x.gguf", 31)


def test_quant_gpu_check_smoke_run_writes_every_model_section(
    two_layer_gguf: Path, tmp_path: Path
) -> None:
    out = tmp_path / "quant_gpu_check.json"
    argv = ["--smoke", "--device", "cpu", "--gguf", str(two_layer_gguf), "--out", str(out)]
    assert quant_gpu_check.main(argv) == 0
    results = json.loads(out.read_text())
    assert "kernels" not in results  # CUDA kernels: on a GPU only
    for section in ("gguf_model", "awq_gptq", "on_the_fly", "throughput"):
        assert "error" not in results[section] and "skipped" not in results[section], section
    # On a CPU the "device" is the CPU itself: the same path twice, equal to the bit.
    assert results["gguf_model"]["teacher_forced_vs_cpu"]["max_abs_err_vs_max"] == 0.0
    assert results["gguf_model"]["greedy_vs_cpu"]["equal_sequences"] == 4
    for row in results["awq_gptq"]["per_checkpoint"].values():
        assert row["passed"] and row["top1_agreement"] >= 0.9
    assert set(results["on_the_fly"]["per_method"]) == {"int4", "int8"}  # fp8: GPUs only
    for method in ("none", "int4", "int8"):
        assert results["throughput"][method]["batch1_decode_ms_per_token"] > 0
