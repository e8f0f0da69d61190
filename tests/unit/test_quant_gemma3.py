"""Gemma 3 270M's Q4_K_M GGUF served quantized (its Q4_K, Q5_0, Q6_K and Q8_0 tensors kept as
integers): teacher-forced next-token agreement with the same model dequantized to float32
(tests.helpers.quant_fidelity), and a 2-stage pipeline equal to one process."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from molink.config import LayerRange
from molink.quant.linear import QuantLinear
from molink.weights import resolve_model_source
from molink.weights.gguf_convert import cached_gguf_source
from tests.helpers.paged_runner import PagedRunner, Seq, split_ranges
from tests.helpers.quant_fidelity import (
    agreement,
    blocks,
    float32_reference,
    prompts,
    teacher_forced,
)

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

# Gemma 3's quantized file agrees with its float32 dequantization on 99.45% of these
# predictions (measured); the bar is the one the SmolLM2 test set before it measured the
# bfloat16 mode itself (98.2%), kept since Gemma clears it on every CPU measured.
FLOAT32_AGREEMENT = 0.982


@pytest.fixture(scope="module")
def quantized_source(gemma3_gguf: Path):
    source = resolve_model_source(str(gemma3_gguf))
    assert source.detected_quantization() == "gguf"
    return source


@pytest.fixture(scope="module")
def float_reference(gemma3_gguf: Path) -> dict[str, list]:
    source = cached_gguf_source(gemma3_gguf, name="gemma-3-270m")
    config = source.model_config
    return float32_reference(
        gemma3_gguf,
        config.vocab_size,
        lambda: source.load_slice(LayerRange(0, config.num_layers), "float32"),
    )


def test_quantized_agrees_with_float32(float_reference, quantized_source) -> None:
    config = quantized_source.model_config
    model = quantized_source.load_slice(LayerRange(0, config.num_layers), "float32")
    assert isinstance(model.embed, QuantLinear) and model.embed.source_type == "Q8_0"
    got = teacher_forced([model], float_reference["sequences"])
    vs_float32 = agreement(got, float_reference["float32"])
    logger.info("top-1 agreement: quantized/float32 %.4f", vs_float32)
    assert vs_float32 >= FLOAT32_AGREEMENT


def test_two_stage_pipeline_equals_one_process(quantized_source) -> None:
    config = quantized_source.model_config
    one = [quantized_source.load_slice(LayerRange(0, config.num_layers), "float32")]
    two = [quantized_source.load_slice(r, "float32") for r in split_ranges(config.num_layers, 2)]
    outputs = []
    for slices in (one, two):
        runner = PagedRunner(slices, 12, 16)
        seqs = [Seq(list(p), blocks(i, 32)) for i, p in enumerate(prompts(config.vocab_size)[:3])]
        runner.step([(s, len(s.tokens)) for s in seqs])
        runner.decode(seqs, 16)
        outputs.append([s.tokens for s in seqs])
    assert outputs[0] == outputs[1]
