"""MoLink's engine against transformers' ``generate`` on SmolLM2, side by side in one run.

Greedy, 128 new tokens (no early stop), 2 torch threads, the same weights (the converted
default model) and dtype on both sides, at 1, 8, 32 and 64 concurrent requests; float32
and bfloat16. Also the peak RSS of a process holding layers [0, 15) against one holding all
30. Writes bench/results/engine.json.

    python bench/engine_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))


from bench.common import machine_info, write_results  # noqa: E402
from molink.engine.offline import LLM  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from molink.weights import default_model_gguf  # noqa: E402
from molink.weights.gguf_convert import cached_gguf_as_hf_dir  # noqa: E402

logger = logging.getLogger("engine_bench")

PROMPT_TOKENS = 32
NEW_TOKENS = 128
THREADS = 2


def make_prompts(tokenizer, count: int) -> list[list[int]]:
    """Distinct prompts of exactly PROMPT_TOKENS tokens (no prefix-cache shortcuts)."""
    base = tokenizer.encode(
        "Write a long story about a lighthouse keeper who finds a message in a bottle and "
        "decides to travel across the ocean to find the sender. Number"
    )[: PROMPT_TOKENS - 4]
    return [base + tokenizer.encode(f" {i:04d}")[:4] for i in range(count)]


def run_molink(llm: LLM, prompts: list[list[int]]) -> float:
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - started
    assert all(len(o.outputs[0].token_ids) == NEW_TOKENS for o in outputs)
    return len(prompts) * NEW_TOKENS / elapsed


def run_transformers(model, prompts: list[list[int]], pad_id: int) -> float:
    width = max(len(p) for p in prompts)
    input_ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=pad_id,
        )
    elapsed = time.perf_counter() - started
    assert out.shape[1] - width == NEW_TOKENS
    return len(prompts) * NEW_TOKENS / elapsed


def bench_dtype(dtype: str, concurrency: list[int]) -> list[dict[str, Any]]:
    from transformers import AutoModelForCausalLM

    model_dir = cached_gguf_as_hf_dir(default_model_gguf())
    llm = LLM(model=None, dtype=dtype)
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    reference.eval()
    pad_id = llm.tokenizer.eos_token_ids[0]
    # Warm both up so that one-time costs don't land in the first measurement.
    run_molink(llm, make_prompts(llm.tokenizer, 2))
    run_transformers(reference, make_prompts(llm.tokenizer, 2), pad_id)
    rows = []
    for n in concurrency:
        prompts = make_prompts(llm.tokenizer, n)
        ours = run_molink(llm, prompts)
        theirs = run_transformers(reference, prompts, pad_id)
        row = {
            "dtype": dtype,
            "concurrency": n,
            "molink_tok_s": round(ours, 2),
            "transformers_tok_s": round(theirs, 2),
            "ratio": round(ours / theirs, 3),
        }
        logger.info("%s", row)
        rows.append(row)
    return rows


RSS_PROBE = """
import json, resource, sys, torch
from molink.config import LayerRange
from molink.weights import resolve_model_source
source = resolve_model_source(None)
start, end = int(sys.argv[1]), int(sys.argv[2])
model = source.load_slice(LayerRange(start, end), "float32")
print(json.dumps({"layers": [start, end],
                  "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def peak_rss(start: int, end: int) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, "-c", RSS_PROBE, str(start), str(end)],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="1 and 8 requests, float32 only")
    parser.add_argument(
        "--bf16-max-concurrency",
        type=int,
        default=8,
        help="bfloat16 runs at most this many requests: without native bf16 matmuls (AVX-512 "
        "without bf16, as here) it is several times slower than float32 on both sides",
    )
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    concurrency = [1, 8] if args.quick else [1, 8, 32, 64]
    rows = bench_dtype("float32", concurrency)
    if not args.quick:
        rows += bench_dtype("bfloat16", [n for n in concurrency if n <= args.bf16_max_concurrency])
    memory = [peak_rss(0, 15), peak_rss(0, 30)]
    payload = {
        "machine": machine_info(),
        "settings": {
            "prompt_tokens": PROMPT_TOKENS,
            "new_tokens": NEW_TOKENS,
            "threads": THREADS,
            "greedy": True,
        },
        "throughput": rows,
        "peak_rss": memory,
        "rss_ratio_half_to_full": round(memory[0]["peak_rss_mib"] / memory[1]["peak_rss_mib"], 3),
    }
    if not args.quick:
        write_results("engine", payload)
    logger.info("%s", json.dumps(payload["throughput"], indent=1))
    logger.info("peak RSS: %s", memory)
    return 0


if __name__ == "__main__":
    sys.exit(main())
