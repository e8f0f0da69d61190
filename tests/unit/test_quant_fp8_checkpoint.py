"""Checkpoints stored in fp8 (vLLM ``fp8``, compressed-tensors FP8) load as their floats.

A tiny random Llama is written by the test in fp8 (float8_e4m3fn weights with a scale per
tensor, per row or per 32 x 32 block, and a static ``input_scale`` as llm-compressor
writes) beside the same model with each matrix dequantized to float32: both must give the
same logits, since the store's ``fp8 x scale`` is exact in float32.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from molink.config import LayerRange
from molink.errors import InvalidParameterError, WeightLoadError
from molink.quant.config import checkpoint_method, resolve_quantization
from molink.weights import resolve_model_source
from molink.weights.fp8_store import dequantize

SHAPE = {"hidden_size": 256, "intermediate_size": 512}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FP8 = torch.float8_e4m3fn
BLOCK = 32

COMPRESSED = {
    "quant_method": "compressed-tensors",
    "format": "float-quantized",
    "config_groups": {
        "group_0": {
            "targets": ["Linear"],
            "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
            "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor"},
        }
    },
    "ignore": ["lm_head"],
}


def _scales(weight: torch.Tensor, layout: str) -> torch.Tensor:
    fp8_max = torch.finfo(FP8).max
    if layout == "tensor":
        return weight.abs().max().reshape(1) / fp8_max
    if layout == "row":
        return weight.abs().amax(1, keepdim=True) / fp8_max
    rows, cols = weight.shape
    blocks = weight.abs().reshape(rows // BLOCK, BLOCK, cols // BLOCK, BLOCK).amax((1, 3))
    return blocks / fp8_max


def _write(float_dir: Path, out: Path, layout: str) -> tuple[Path, Path]:
    """(fp8 checkpoint, the same matrices dequantized to float32)."""
    tensors = load_file(str(float_dir / "model.safetensors"))
    stored, floats = dict(tensors), dict(tensors)
    for name, weight in tensors.items():
        if not any(f".{linear}.weight" in name for linear in LINEARS):
            continue
        scale = _scales(weight.float(), layout)
        full = scale
        if layout == "block":
            full = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)
        values = (weight.float() / full).to(FP8)
        base = name.removesuffix(".weight")
        suffix = "weight_scale_inv" if layout == "block" else "weight_scale"
        stored.update({name: values, f"{base}.{suffix}": scale.float()})
        stored[f"{base}.input_scale"] = torch.tensor([0.02])
        floats[name] = values.float() * full
    config = json.loads((float_dir / "config.json").read_text())
    if layout == "block":
        quant = {"quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
    elif layout == "row":
        quant = COMPRESSED
    else:
        quant = {"quant_method": "fp8", "activation_scheme": "static"}
    dirs = []
    for kind, data, cfg in (("q", stored, {**config, "quantization_config": quant}),
                            ("f", floats, config)):  # fmt: skip
        target = out / f"fp8-{layout}-{kind}"
        shutil.copytree(float_dir, target)
        save_file(data, str(target / "model.safetensors"), metadata={"format": "pt"})
        (target / "config.json").write_text(json.dumps(cfg))
        dirs.append(target)
    return dirs[0], dirs[1]


def _logits(directory: Path) -> torch.Tensor:
    from molink.models import SeqChunk
    from tests.helpers.paged_runner import PagedRunner

    source = resolve_model_source(str(directory))
    model = source.load_slice(LayerRange(0, source.model_config.num_layers), "float32")
    runner = PagedRunner([model], num_blocks=8, block_size=4)
    prompt = [5, 17, 99, 3, 250, 7, 8, 40, 41]
    hidden = runner.forward([SeqChunk(0, len(prompt), [0, 1, 2])], prompt)
    return model.compute_logits(hidden)


@pytest.mark.parametrize("layout", ["tensor", "row", "block"])
def test_fp8_checkpoint_equals_its_dequantized_float_model(
    tiny_model_dir, tmp_path: Path, layout: str
) -> None:
    qdir, fdir = _write(tiny_model_dir("llama", **SHAPE), tmp_path, layout)
    source = resolve_model_source(str(qdir))
    assert source.detected_quantization() == "fp8"
    got, expected = _logits(qdir), _logits(fdir)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_fp8_methods_and_refusals() -> None:
    assert resolve_quantization(None, "fp8") == "none"  # CPU: dequantized at load
    assert resolve_quantization("int4", "fp8") == "int4"
    with pytest.raises(InvalidParameterError, match="fp8 weights need a GPU"):
        resolve_quantization("fp8", "fp8")
    with pytest.raises(InvalidParameterError, match="'gguf' cannot run .* stored in fp8"):
        resolve_quantization("gguf", "fp8")
    assert checkpoint_method({"quantization_config": COMPRESSED}) == "fp8"
    int4_groups = json.loads(json.dumps(COMPRESSED).replace('"float"', '"int"'))
    assert checkpoint_method({"quantization_config": int4_groups}) == "compressed-tensors"
    with pytest.raises(InvalidParameterError, match="'compressed-tensors' is not supported"):
        resolve_quantization(None, "compressed-tensors")


def test_scale_of_the_wrong_shape_is_named() -> None:
    weight = torch.ones(64, 64).to(FP8)
    with pytest.raises(WeightLoadError, match=r"blk.w \[64, 64\] has a scale of shape"):
        dequantize(weight, torch.ones(3, 5), (32, 32), "blk.w")
    assert torch.equal(dequantize(weight, torch.full((2, 2), 2.0), (32, 32), "w"),
                       torch.full((64, 64), 2.0))  # fmt: skip
