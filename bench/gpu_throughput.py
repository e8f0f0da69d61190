"""Throughput part of the device check (bench/gpu_check.py): a Llama-3.2-1B-shaped random
model in bfloat16, MoLink with CUDA graphs on and off vs transformers ``generate`` with a
static cache, on the same device."""

from __future__ import annotations

import functools
import gc
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench.gpu_models import build_shaped, memory_bandwidth, weight_bytes
from molink.engine.offline import LLM
from molink.sampling_params import SamplingParams

logger = logging.getLogger("gpu_check")

CONCURRENCY = (1, 16, 64, 256)
PROMPT_TOKENS = NEW_TOKENS = 128
SMOKE_CONCURRENCY = (1, 2)
SMOKE_TOKENS = 8


def _prompts(count: int, length: int, vocab: int) -> list[list[int]]:
    return [[(11 + 7919 * (i * length + j)) % vocab for j in range(length)] for i in range(count)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _ours(llm: LLM, prompts: list[list[int]], new: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)
    started = time.perf_counter()
    llm.generate(prompts, params)
    return time.perf_counter() - started


def _theirs(model: torch.nn.Module, prompts: list[list[int]], new: int, *, device) -> float:
    ids = torch.tensor(prompts, device=device)
    _sync(device)
    started = time.perf_counter()
    with torch.no_grad():
        model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            cache_implementation="static",
            disable_compile=True,  # compiling per batch size would not fit the time budget
            pad_token_id=0,
        )
    _sync(device)
    return time.perf_counter() - started


def _sweep(
    run: Callable[[list[list[int]], int], float],
    vocab: int,
    concurrency: tuple[int, ...],
    tokens: int,
    time_left: Callable[[], float],
) -> dict[str, Any]:
    run(_prompts(1, tokens, vocab), 2)  # warm-up (allocations, kernels, graph capture)
    rows: dict[str, Any] = {}
    for n in concurrency:
        if time_left() < 20:
            rows[str(n)] = {"skipped": "time budget"}
            continue
        seconds = run(_prompts(n, tokens, vocab), tokens)
        rows[str(n)] = {
            "seconds": round(seconds, 3),
            "tokens_per_s": round(n * tokens / seconds, 1),
        }
    one = _prompts(1, tokens, vocab)
    first = run(one, 1)
    whole = run(one, tokens)
    rows["batch1_decode_ms_per_token"] = round(1e3 * (whole - first) / (tokens - 1), 3)
    return rows


def _sweep_ours(
    path: Path,
    device: torch.device,
    eager: bool,
    concurrency: tuple[int, ...],
    tokens: int,
    vocab: int,
    time_left: Callable[[], float],
) -> dict[str, Any]:
    llm = LLM(
        model=str(path),
        device=str(device),
        dtype="bfloat16",
        max_num_seqs=max(concurrency),
        max_num_batched_tokens=max(2048, max(concurrency)),
        max_model_len=2 * tokens + 16,
        enforce_eager=eager,
    )
    return _sweep(functools.partial(_ours, llm), vocab, concurrency, tokens, time_left)


def throughput_section(
    device: torch.device, work: Path, smoke: bool, time_left: Callable[[], float]
) -> dict[str, Any]:
    concurrency = SMOKE_CONCURRENCY if smoke else CONCURRENCY
    tokens = SMOKE_TOKENS if smoke else PROMPT_TOKENS
    path = work / "throughput-llama-3.2-1b"
    reference = build_shaped("llama-3.2-1b", path, device, torch.bfloat16, smoke)
    vocab = reference.config.vocab_size
    weights = weight_bytes(reference)
    bandwidth = memory_bandwidth(device, 256 << 20 if smoke else 2 << 30)
    result: dict[str, Any] = {
        "model": "Llama-3.2-1B-shaped, random, bfloat16",
        "prompt_tokens": tokens,
        "new_tokens": tokens,
        "weight_bytes": weights,
        "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "weight_read_bound_ms_per_token": round(1e3 * weights / bandwidth, 3),
        # Graphs are captured on CUDA only: elsewhere both MoLink rows run eagerly.
        "graphs_captured": device.type == "cuda",
    }
    result["transformers_static_cache"] = _sweep(
        functools.partial(_theirs, reference, device=device), vocab, concurrency, tokens, time_left
    )
    del reference
    _release(device)
    for label, eager in (("molink_cuda_graphs", False), ("molink_eager", True)):
        result[label] = _sweep_ours(path, device, eager, concurrency, tokens, vocab, time_left)
        _release(device)
    ours = result["molink_cuda_graphs"].get("64", {}).get("tokens_per_s")
    theirs = result["transformers_static_cache"].get("64", {}).get("tokens_per_s")
    if ours and theirs:
        result["speedup_at_64"] = round(ours / theirs, 2)
    bound = result["weight_read_bound_ms_per_token"]
    batch1 = result["molink_cuda_graphs"]["batch1_decode_ms_per_token"]
    result["batch1_vs_weight_read_bound"] = round(batch1 / bound, 2) if bound else None
    return result


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
