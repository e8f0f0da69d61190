"""Whole quantized models on a device, for the quantized device check (bench/quant_gpu_check.py).

* ``gguf_model``: a real GGUF (SmolLM2 Q4_1, or its first layers) kept quantized on the
  device against the same file on the CPU: teacher-forced top-1 agreement of every prompt
  position, and greedy tokens served through ``LLM``;
* ``awq_gptq``: tiny random llamas quantized here into AWQ and GPTQ tensor layouts (group
  128 and 32), loaded on the device from ``quantization_config``, against their dequantized
  float model (ours in float32, and transformers ``generate`` for greedy tokens);
* ``on_the_fly``: a float checkpoint with ``--quantization int4 | int8 | fp8`` on the device
  against transformers in float32;
* ``throughput``: a Llama-3.2-1B-shaped random model in bfloat16 against the same with
  ``--quantization int4`` (and fp8 where the GPU has it): batch-1 decode ms/token and
  tokens/s at 64 concurrent requests.

Every comparison reports figures; the pass marks are the unit tests' own bounds.
"""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.gpu_models import build_shaped, greedy_tokens, weight_bytes
from molink.config import LayerRange
from molink.engine.offline import LLM
from molink.models import SeqChunk
from molink.quant.fp8 import MIN_CAPABILITY
from molink.sampling_params import SamplingParams
from molink.weights import resolve_model_source
from tests.helpers.int4_checkpoints import make_int4_checkpoints
from tests.helpers.paged_runner import PagedRunner
from tests.helpers.tiny_models import load_reference_model, make_tiny_model

logger = logging.getLogger("quant_gpu_check")

PROMPTS = [
    [1, 504, 3458, 314, 4649, 30, 476, 253, 1345],
    [19, 1848, 9654, 30, 314, 2593, 28],
    [504, 20, 30, 9, 88, 1021, 33, 77, 5, 6, 7],
    [2, 3, 4],
]
TINY_SHAPE = {"hidden_size": 256, "intermediate_size": 512}
# The unit tests' bounds (tests/unit/test_quant_awq_gptq.py): bfloat16 activations in the
# int4 kernel move logits a few percent over 4 random layers.
LOGITS_BOUND, AGREEMENT_BOUND = 0.08, 0.9
LLM_OPTIONS = dict(max_model_len=128, max_num_seqs=8, kv_cache_memory_bytes=1 << 28)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def teacher_forced_logits(
    source_dir: str | Path, device: torch.device, dtype: str, quantization: str | None, vocab: int
) -> torch.Tensor:
    """Logits of every position of PROMPTS (ids folded into the vocabulary), float32 on CPU."""
    source = resolve_model_source(str(source_dir), quantization=quantization)
    layers = LayerRange(0, source.model_config.num_layers)
    model = source.load_slice(layers, dtype, device=str(device), quantization=quantization)
    runner = PagedRunner([model], num_blocks=32, block_size=16, device=device)
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    chunks = [SeqChunk(0, len(p), [i]) for i, p in enumerate(prompts)]
    with torch.no_grad():
        hidden = runner.forward(chunks, [t for p in prompts for t in p])
        logits = model.compute_logits(hidden).float().cpu()
    del model, runner
    release(device)
    return logits


def compare_logits(got: torch.Tensor, expected: torch.Tensor) -> dict[str, Any]:
    return {
        "top1_agreement": round(float((got.argmax(-1) == expected.argmax(-1)).float().mean()), 4),
        "max_abs_err_vs_max": round(float((got - expected).abs().max() / expected.abs().max()), 4),
        "positions": int(got.shape[0]),
    }


def greedy(
    model: str | Path, device: torch.device, new: int, vocab: int, **options: Any
) -> list[list[int]]:
    llm = LLM(model=str(model), device=str(device), **LLM_OPTIONS, **options)
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    tokens = [list(o.outputs[0].token_ids) for o in llm.generate(prompts, params)]
    del llm
    release(device)
    return tokens


def transformers_greedy(path: Path, device: torch.device, new: int, vocab: int) -> list[list[int]]:
    reference = load_reference_model(path, attn_implementation="eager").to(device)
    prompts = [[t % vocab for t in p] for p in PROMPTS]
    tokens = greedy_tokens(reference, prompts, new, device)
    del reference
    release(device)
    return tokens


def compare_tokens(ours: list[list[int]], theirs: list[list[int]]) -> dict[str, Any]:
    """Equal sequences, and where each first differs (greedy tokens drift apart after one
    near-tie, so the first difference says more than a count of equal tokens)."""
    first = []
    for a, b in zip(ours, theirs, strict=True):
        diff = next((i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y), None)
        first.append(diff)
    return {
        "equal_sequences": sum(d is None for d in first),
        "of": len(first),
        "first_difference": first,
    }


def gguf_model(gguf: Path, device: torch.device, smoke: bool) -> dict[str, Any]:
    """The GGUF kept quantized on ``device`` against the same on the CPU."""
    vocab = resolve_model_source(str(gguf), quantization="gguf").model_config.vocab_size
    here = teacher_forced_logits(gguf, device, "bfloat16", "gguf", vocab)
    cpu = teacher_forced_logits(gguf, torch.device("cpu"), "bfloat16", "gguf", vocab)
    new = 8 if smoke else 24
    result: dict[str, Any] = {
        "file": gguf.name,
        "teacher_forced_vs_cpu": compare_logits(here, cpu),
        "greedy_vs_cpu": compare_tokens(
            greedy(gguf, device, new, vocab, quantization="gguf", dtype="bfloat16"),
            greedy(gguf, torch.device("cpu"), new, vocab, quantization="gguf", dtype="bfloat16"),
        ),
    }
    result["passed"] = result["teacher_forced_vs_cpu"]["top1_agreement"] >= AGREEMENT_BOUND
    return result


def awq_gptq(device: torch.device, work: Path, smoke: bool) -> dict[str, Any]:
    """Each format and group size, quantized checkpoint vs its dequantized float model."""
    float_dir = make_tiny_model("llama", work / "awq-gptq-float", **TINY_SHAPE)
    vocab = resolve_model_source(str(float_dir)).model_config.vocab_size
    rows: dict[str, Any] = {}
    passed = True
    for method in ("awq", "gptq"):
        for group in (128, 32):
            qdir, fdir = make_int4_checkpoints(float_dir, work, method, group)
            got = teacher_forced_logits(qdir, device, "float32", None, vocab)
            expected = teacher_forced_logits(fdir, device, "float32", None, vocab)
            row = compare_logits(got, expected)
            new = 8 if smoke else 16
            row["greedy_vs_transformers_float"] = compare_tokens(
                greedy(qdir, device, new, vocab, dtype="float32"),
                transformers_greedy(fdir, device, new, vocab),
            )
            row["passed"] = (
                row["max_abs_err_vs_max"] <= LOGITS_BOUND
                and row["top1_agreement"] >= AGREEMENT_BOUND
            )
            passed &= row["passed"]
            rows[f"{method}_g{group}"] = row
            logger.info("%s g%d: %s", method, group, row)
    return {"per_checkpoint": rows, "passed": passed}


def on_the_fly_methods(device: torch.device) -> tuple[str, ...]:
    fp8 = device.type == "cuda" and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
    return ("int4", "int8", "fp8") if fp8 else ("int4", "int8")


def on_the_fly(device: torch.device, work: Path, smoke: bool) -> dict[str, Any]:
    """A float checkpoint quantized at load on ``device``: against the same quantization on
    the CPU (the kernels' own error; fp8 runs on GPUs only), and against the float model (the
    rounding itself, large on a tiny random model whose logits nearly tie)."""
    float_dir = make_tiny_model("llama", work / "on-the-fly-float", **TINY_SHAPE)
    vocab = resolve_model_source(str(float_dir)).model_config.vocab_size
    new = 8 if smoke else 16
    theirs = transformers_greedy(float_dir, device, new, vocab)
    expected = teacher_forced_logits(float_dir, device, "float32", None, vocab)
    rows: dict[str, Any] = {}
    passed = True
    for method in on_the_fly_methods(device):
        got = teacher_forced_logits(float_dir, device, "bfloat16", method, vocab)
        row: dict[str, Any] = {
            "teacher_forced_vs_float32": compare_logits(got, expected),
            "greedy_vs_transformers_float32": compare_tokens(
                greedy(float_dir, device, new, vocab, quantization=method, dtype="bfloat16"),
                theirs,
            ),
        }
        if method != "fp8":
            cpu = teacher_forced_logits(float_dir, torch.device("cpu"), "bfloat16", method, vocab)
            row["teacher_forced_vs_cpu"] = compare_logits(got, cpu)
            row["passed"] = row["teacher_forced_vs_cpu"]["max_abs_err_vs_max"] <= LOGITS_BOUND
            passed &= row["passed"]
        rows[method] = row
        logger.info("on the fly %s: %s", method, row)
    return {"per_method": rows, "passed": passed}


def _timed_generate(llm: LLM, length: int, vocab: int, count: int, new: int) -> float:
    prompts = [[(11 + 7919 * (i * length + j)) % vocab for j in range(length)]
               for i in range(count)]  # fmt: skip
    started = time.perf_counter()
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=new, ignore_eos=True))
    return time.perf_counter() - started


def _decode_rates(
    path: Path, device: torch.device, tokens: int, streams: int, vocab: int, **options: Any
) -> dict[str, Any]:
    llm = LLM(
        model=str(path),
        device=str(device),
        dtype="bfloat16",
        max_num_seqs=streams,
        max_num_batched_tokens=max(2048, streams),
        max_model_len=2 * tokens + 16,
        **options,
    )

    run = functools.partial(_timed_generate, llm, tokens, vocab)
    run(1, 2)  # warm-up: allocations, kernels, graph capture
    # The fastest of two tries each: one slow call (a first capture, a collection) would
    # otherwise make the difference meaningless.
    first = min(run(1, 1) for _ in range(2))
    whole = min(run(1, tokens) for _ in range(2))
    many = run(streams, tokens)
    del llm, run
    release(device)
    return {
        "batch1_decode_ms_per_token": round(1e3 * (whole - first) / (tokens - 1), 3),
        f"tokens_per_s_at_{streams}": round(streams * tokens / many, 1),
    }


def throughput(
    device: torch.device, work: Path, smoke: bool, time_left: Callable[[], float]
) -> dict[str, Any]:
    path = work / "quant-throughput-llama-3.2-1b"
    reference = build_shaped("llama-3.2-1b", path, device, torch.bfloat16, smoke)
    vocab = reference.config.vocab_size
    result: dict[str, Any] = {
        "model": "Llama-3.2-1B-shaped, random, bfloat16 checkpoint",
        "bf16_weight_bytes": weight_bytes(reference),
    }
    del reference
    release(device)
    tokens, streams = (8, 2) if smoke else (128, 64)
    for method in ("none", *on_the_fly_methods(device)):
        if time_left() < 40:
            result[method] = {"skipped": "time budget"}
            continue
        try:
            result[method] = _decode_rates(
                path, device, tokens, streams, vocab, quantization=method
            )
        except Exception as exc:  # one method's failure keeps the others' figures
            logger.exception("throughput %s failed", method)
            result[method] = {"error": f"{type(exc).__name__}: {exc}"}
        logger.info("throughput %s: %s", method, result[method])
    return result
