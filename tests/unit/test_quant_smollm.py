"""SmolLM2-135M's Q4_1 GGUF served quantized: fidelity, pipeline equality, memory.

Teacher-forced next-token top-1 agreement over 20 prompts x 64 tokens (the float32
model's own greedy continuations) of the quantized model against the same model
dequantized to float32, which must be at least the bfloat16 mode's (see BF16_AGREEMENT). The
float32 predictions are cached on disk (keyed by the GGUF file, torch's version and the
prompts), so a warm run loads only the quantized model.
"""

from __future__ import annotations

import hashlib
import json
import logging

import pytest
import torch

from molink.config import LayerRange
from molink.quant.bf16_gemm import bf16_gemm_available
from molink.quant.fp16_gemm import fp16_gemm_available
from molink.quant.linear import QuantLinear
from molink.quant.memory import resident_weight_bytes
from molink.weights import default_model_gguf, resolve_model_source
from tests.helpers.paged_runner import PagedRunner, Seq, split_ranges
from tests.helpers.quant_fidelity import BLOCK, NEW_TOKENS
from tests.helpers.quant_fidelity import blocks as _blocks
from tests.helpers.quant_fidelity import continuations as _continuations
from tests.helpers.quant_fidelity import prompts as _prompts
from tests.helpers.quant_fidelity import teacher_forced as _teacher_forced

pytestmark = pytest.mark.slow
logger = logging.getLogger(__name__)

# The bfloat16 mode (the model loaded and run in bfloat16, `--dtype bfloat16`) agrees with
# float32 on 97.66% of these predictions on an AVX2 machine and on 97.58% on an AVX-512 one
# with bf16 dot products (bench/results/quant_bf16_agreement*.json, measured side by side
# with the quantized kernels). The int4 kernel's own agreement also depends on the CPU: it
# rounds activations to bf16 everywhere, and where the CPU has bf16 dot products it also
# multiplies the dequantized weights in bf16 (98.20% on the AVX2 machine, 97.73% on the
# AVX-512 one). The bar is the lower of the two bf16 figures, 1249 of 1280 predictions
# (stricter than the bfloat16 mode with packed matrices, 1247 on the AVX-512 machine).
BF16_AGREEMENT = 1249 / 1280
# The ``bf16`` batch kernel multiplies as the bfloat16 mode does (weights, activations and
# outputs in bfloat16; 1250 of 1280 on the AVX-512 machine). The bfloat16 mode's own figure
# moves with the accumulation order of its products: 1249 unpacked and 1247 with oneDNN's
# packed matrices on that machine, 1250 on AVX2 (bench/results/quant_bf16_agreement*.json).
# The bar is the lowest bfloat16 mode figure less 2 predictions (0.16%) for that order.
BF16_COPY_AGREEMENT = 1245 / 1280
BATCH_KERNELS = (
    ["int4", "int8act"]
    + (["fp16"] if fp16_gemm_available() else [])
    + (["bf16"] if bf16_gemm_available() else [])
)


@pytest.fixture(scope="module")
def float_reference() -> dict[str, list]:
    from molink.weights.cache import default_cache_dir, file_key

    source = resolve_model_source(None)
    prompts = _prompts(source.model_config.vocab_size)
    ident = json.dumps([file_key(default_model_gguf()), torch.__version__, prompts, NEW_TOKENS])
    digest = hashlib.sha256(ident.encode()).hexdigest()[:16]
    cached = default_cache_dir() / "test-references" / f"smollm-q41-fidelity-{digest}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    layers = LayerRange(0, source.model_config.num_layers)
    float32 = source.load_slice(layers, "float32")
    sequences = _continuations(float32, prompts)
    result = {
        "sequences": sequences,
        "float32": _teacher_forced([float32], sequences).tolist(),
    }
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result))
    return result


@pytest.fixture(scope="module")
def quantized_source():
    return resolve_model_source(None, quantization="gguf")


@pytest.mark.parametrize("batch_kernel", BATCH_KERNELS)
def test_quantized_agrees_with_float32(float_reference, quantized_source, batch_kernel) -> None:
    """20 rows per decode step: the int4 kernel, or the float16 / bfloat16 copy."""
    layers = LayerRange(0, quantized_source.model_config.num_layers)
    model = quantized_source.load_slice(layers, "float32", batch_kernel=batch_kernel)
    assert isinstance(model.embed, QuantLinear) and model.lm_head is model.embed
    got = _teacher_forced([model], float_reference["sequences"])
    float32 = torch.tensor(float_reference["float32"])
    vs_float32 = float((got == float32).float().mean())
    logger.info("top-1 agreement: quantized (%s)/float32 %.4f", batch_kernel, vs_float32)
    assert vs_float32 >= (BF16_COPY_AGREEMENT if batch_kernel == "bf16" else BF16_AGREEMENT)


def test_quantized_memory_stays_near_the_file(quantized_source) -> None:
    layers = LayerRange(0, quantized_source.model_config.num_layers)
    model = quantized_source.load_slice(layers, "float32")
    file_bytes = default_model_gguf().stat().st_size
    assert resident_weight_bytes(model) <= 1.3 * file_bytes


def test_two_stage_pipeline_equals_one_process(quantized_source) -> None:
    config = quantized_source.model_config
    one = [quantized_source.load_slice(LayerRange(0, config.num_layers), "float32")]
    two = [quantized_source.load_slice(r, "float32") for r in split_ranges(config.num_layers, 2)]
    outputs = []
    for slices in (one, two):
        runner = PagedRunner(slices, 8, BLOCK)
        seqs = [Seq(list(p), _blocks(i, 32)) for i, p in enumerate(_prompts(config.vocab_size)[:3])]
        runner.step([(s, len(s.tokens)) for s in seqs])
        runner.decode(seqs, 8)
        outputs.append([s.tokens for s in seqs])
    assert outputs[0] == outputs[1]
