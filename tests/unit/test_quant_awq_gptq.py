"""AWQ and GPTQ checkpoints (tiny random models quantized by the test) and the flags."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from molink.config import LayerRange
from molink.errors import InvalidParameterError, WeightLoadError
from molink.models import SeqChunk
from molink.quant.awq_gptq import awq_group_ints, gptq_group_ints
from molink.quant.config import resolve_kv_cache_dtype, resolve_quantization
from molink.quant.linear import QuantLinear
from molink.quant.memory import resident_weight_bytes
from molink.weights import resolve_model_source
from tests.helpers.int4_checkpoints import (
    act_order_quantize,
    awq_tensors,
    dequantized,
    gptq_tensors,
    make_int4_checkpoints,
    quantize,
)
from tests.helpers.paged_runner import PagedRunner

SHAPE = {"hidden_size": 256, "intermediate_size": 512}
PROMPTS = [[5, 17, 99, 3, 250, 7, 8], [40, 41], [300, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]


@pytest.mark.parametrize("group", [128, 32])
def test_unpacking_is_exact(group: int) -> None:
    weight = torch.randn(96, 256) * 0.05
    q, zeros, scales = quantize(weight, group)
    expected = dequantized(q, zeros, scales, group)
    awq = awq_group_ints(*awq_tensors(q, zeros, scales).values(), group)
    assert torch.equal(awq.dequantize(), expected)
    gptq = gptq_tensors(q, zeros, scales, group)
    ints = gptq_group_ints(gptq["qweight"], gptq["qzeros"], gptq["scales"], group, gptq["g_idx"])
    assert torch.equal(ints.dequantize(), expected)


def _run(source_dir: Path, quantization: str | None = None) -> tuple[torch.Tensor, torch.nn.Module]:
    """Logits of every prompt position, then of one decode step with fixed tokens
    (teacher-forced: both models see the same tokens whatever they would pick)."""
    source = resolve_model_source(str(source_dir))
    layers = source.model_config.num_layers
    model = source.load_slice(LayerRange(0, layers), "float32", quantization=quantization)
    runner = PagedRunner([model], num_blocks=16, block_size=4)
    blocks = [list(range(4 * i, 4 * i + 4)) for i in range(len(PROMPTS))]
    chunks = [SeqChunk(0, len(p), b) for p, b in zip(PROMPTS, blocks, strict=True)]
    prefill = runner.forward(chunks, [t for p in PROMPTS for t in p])
    steps = [SeqChunk(len(p), 1, b) for p, b in zip(PROMPTS, blocks, strict=True)]
    decode = runner.forward(steps, [7] * len(PROMPTS))
    return model.compute_logits(torch.cat([prefill, decode])), model


@pytest.mark.parametrize("method", ["awq", "gptq"])
@pytest.mark.parametrize("group", [128, 32, -1])  # -1: per channel (one group per row)
def test_checkpoint_matches_its_dequantized_float_model(
    tiny_model_dir, tmp_path: Path, method: str, group: int
) -> None:
    qdir, fdir = make_int4_checkpoints(tiny_model_dir("llama", **SHAPE), tmp_path, method, group)
    got, model = _run(qdir)  # detected from quantization_config
    expected, float_model = _run(fdir)
    assert all(isinstance(layer.attn.qkv, QuantLinear) for layer in model.layers)
    # bfloat16 activations in the int4 kernel: a few percent over 4 random layers; top-1
    # may differ only where two logits nearly tie.
    assert (got - expected).abs().max() <= 0.08 * expected.abs().max()
    agree = (got.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree >= 0.9
    assert resident_weight_bytes(model) < 0.5 * resident_weight_bytes(float_model)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_gptq_zero_points_follow_the_checkpoint_format(
    tiny_model_dir, tmp_path: Path, checkpoint_format: str
) -> None:
    """GPTQModel's ``checkpoint_format: gptq_v2`` stores zero points as they are (v1:
    minus one); both read back into exactly the matrices they stand for."""
    qdir, fdir = make_int4_checkpoints(
        tiny_model_dir("llama", **SHAPE), tmp_path, "gptq", 32, checkpoint_format
    )
    quantized = resolve_model_source(str(qdir)).open_tensors_for("gptq")
    floats = resolve_model_source(str(fdir)).open_tensors()
    name = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(quantized[name].dequantize(), floats[name])


def test_act_order_unpacking_is_exact() -> None:
    weight = torch.randn(96, 256) * 0.05
    q, zeros, scales, g_idx, expected = act_order_quantize(weight, 32)
    gptq = gptq_tensors(q, zeros, scales, 32, g_idx=g_idx)
    ints = gptq_group_ints(gptq["qweight"], gptq["qzeros"], gptq["scales"], 32, gptq["g_idx"])
    assert ints.input_order is not None
    assert torch.equal(ints.dequantize(), expected)
    # A quantized LM head may be act-order too (and tied, the embedding): rows come back
    # in input order, as the int4 kernel holds them (bfloat16 scales).
    table = QuantLinear(256, 96, bias=False, table=True)
    table.load_weight(ints, pack=False)
    ids = torch.tensor([0, 5, 95])
    step = scales.float().abs().max()
    assert (table.embedding(ids) - expected[ids]).abs().max() <= 16 * step * 2**-8
    with pytest.raises(WeightLoadError, match="does not put 32 inputs in every group"):
        gptq_group_ints(gptq["qweight"], gptq["qzeros"], gptq["scales"], 32, g_idx % 4)


@pytest.mark.parametrize("group", [128, 32])
def test_act_order_checkpoint_matches_its_dequantized_float_model(
    tiny_model_dir, tmp_path: Path, group: int
) -> None:
    """desc_act GPTQ (its groups gather inputs that are not neighbours) was refused; its
    columns are now held sorted by group and each product takes its inputs in that order."""
    base = tiny_model_dir("llama", **SHAPE)
    qdir, fdir = make_int4_checkpoints(base, tmp_path, "gptq", group, act_order=True)
    got, model = _run(qdir)
    expected, _ = _run(fdir)
    assert all(layer.attn.qkv.input_order is not None for layer in model.layers)
    assert (got - expected).abs().max() <= 0.08 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9
    # The same products as the float matrix the integers stand for, up to the int4
    # kernel's bfloat16 activations: checked on one layer's MLP exactly in float32 too.
    up = model.layers[0].mlp.down
    x = torch.randn(3, up.in_features, generator=torch.Generator().manual_seed(2))
    weight = resolve_model_source(str(fdir)).open_tensors()["model.layers.0.mlp.down_proj.weight"]
    assert torch.allclose(up.product(x), x.bfloat16().float() @ weight.t(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("checkpoint_format", ["gptq", "gptq_v2"])
def test_eight_bit_gptq_matches_its_dequantized_float_model(
    tiny_model_dir, tmp_path: Path, checkpoint_format: str
) -> None:
    """GPTQ-Int8 (four integers per int32, 0..255) was refused; it runs as two int4 planes
    of its centred integers, exactly the matrix it stands for up to bfloat16 scales."""
    base = tiny_model_dir("llama", **SHAPE)
    qdir, fdir = make_int4_checkpoints(base, tmp_path, "gptq", 32, checkpoint_format, bits=8)
    name = "model.layers.0.mlp.down_proj.weight"
    ints = resolve_model_source(str(qdir)).open_tensors_for("gptq")[name]
    assert torch.equal(ints.dequantize(), resolve_model_source(str(fdir)).open_tensors()[name])
    got, model = _run(qdir)
    expected, _ = _run(fdir)
    assert all(len(layer.attn.qkv.planes.packed) == 2 for layer in model.layers)
    assert (got - expected).abs().max() <= 0.03 * expected.abs().max()
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_gptq_layouts_we_cannot_read_are_refused(tiny_model_dir, tmp_path: Path) -> None:
    qdir, _ = make_int4_checkpoints(
        tiny_model_dir("llama", **SHAPE), tmp_path, "gptq", 32, "marlin"
    )
    with pytest.raises(WeightLoadError, match="checkpoint_format = 'marlin'"):
        _run(qdir)


def test_quantization_choices_are_checked() -> None:
    assert resolve_quantization(None, "awq") == "awq"
    assert resolve_quantization(None, "gguf") == "gguf"
    assert resolve_quantization("none", "gguf") == "none"
    assert resolve_quantization("int4", "none") == "int4"
    with pytest.raises(InvalidParameterError, match="'int4' cannot run .* quantized with awq"):
        resolve_quantization("int4", "awq")
    with pytest.raises(InvalidParameterError, match="'gptq' cannot run .* GGUF file"):
        resolve_quantization("gptq", "gguf")
    with pytest.raises(InvalidParameterError, match="fp8 weights need a GPU"):
        resolve_quantization("fp8", "none")
    with pytest.raises(InvalidParameterError, match="quant_method 'bitsandbytes'"):
        resolve_quantization(None, "bitsandbytes")
    with pytest.raises(InvalidParameterError, match="quantization"):
        resolve_quantization("int3", "none")


def test_kv_cache_dtypes() -> None:
    assert resolve_kv_cache_dtype("auto", torch.float32) == torch.float32
    assert resolve_kv_cache_dtype("bfloat16", torch.float32) == torch.bfloat16
    # Weights through the CPU's int4 kernel (bfloat16 products): auto is bfloat16.
    for method in ("gguf", "awq", "gptq", "int4", "int8"):
        assert resolve_kv_cache_dtype("auto", torch.float32, "cpu", method) == torch.bfloat16
        assert resolve_kv_cache_dtype("float32", torch.float32, "cpu", method) == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.float32, "cpu", "none") == torch.float32
    assert resolve_kv_cache_dtype("auto", torch.float16, "cuda", "awq") == torch.float16
    assert resolve_kv_cache_dtype("auto", torch.float32, "cuda", "gguf") == torch.float32
    with pytest.raises(InvalidParameterError, match="fp8 KV cache needs a GPU"):
        resolve_kv_cache_dtype("fp8", torch.float32)


def test_eight_bit_awq_is_refused(tiny_model_dir, tmp_path: Path) -> None:
    qdir, _ = make_int4_checkpoints(tiny_model_dir("llama", **SHAPE), tmp_path, "awq", 128)
    config = (qdir / "config.json").read_text().replace('"bits": 4', '"bits": 8')
    (qdir / "config.json").write_text(config)
    with pytest.raises(WeightLoadError, match="bits = 8"):
        _run(qdir)


def test_resident_bytes_are_reported(tiny_model_dir, tmp_path: Path) -> None:
    from molink.quant.memory import RESIDENT

    before = RESIDENT.get("weights")
    qdir, _ = make_int4_checkpoints(tiny_model_dir("llama", **SHAPE), tmp_path, "gptq", 32)
    _, model = _run(qdir)
    assert RESIDENT.get("weights") - before == resident_weight_bytes(model) > 0
    text = "\n".join(RESIDENT.metric_lines())
    assert "molink:resident_weights_bytes" in text and "molink:resident_kv_cache_bytes" in text
