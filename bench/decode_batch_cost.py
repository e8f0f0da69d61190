"""What one decode token costs at each batch size, on one torch thread.

Pipelining splits the running requests into K micro-batches, so every stage runs K decode
steps of ``running / K`` rows where one process runs one step of ``running`` rows. Where a
decode step's time is mostly streaming the weights from memory (a CPU, small batches),
that multiplies the weight traffic by K; this benchmark measures how much, on SmolLM2 in
float32 through the offline engine: decode-only time per generated token at batch sizes
1-32 (prompts of 16 distinct tokens, 64 new tokens, ignore_eos; the first token of each
request, which carries the prefill, is left out of the decode time).

    python bench/decode_batch_cost.py [--batches 1,4,8,11,16,32]

Writes ``bench/results/decode_batch_cost.json``.
"""

from __future__ import annotations

import argparse
import logging
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

logger = logging.getLogger("decode_batch_cost")

PROMPT_TOKENS = 16
NEW_TOKENS = 64


def prompts(count: int, vocab: int) -> list[list[int]]:
    """Distinct prompts (no shared prefix, so no prefix-cache shortcuts)."""
    return [[(1000 + 7919 * (i * PROMPT_TOKENS + j)) % vocab for j in range(PROMPT_TOKENS)]
            for i in range(count)]  # fmt: skip


def decode_seconds_per_token(llm: LLM, batch: int) -> dict[str, Any]:
    """Times the batch's decode steps: first token out (prefill) to the last token out."""
    first_token = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    whole = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    batch_prompts = prompts(batch, llm.tokenizer.vocab_size)
    started = time.perf_counter()
    llm.generate(batch_prompts, first_token)
    prefill_s = time.perf_counter() - started
    # The prompts are now in the prefix cache: this run's prefill is nearly free, and what
    # is left is one prefill-cheap step plus NEW_TOKENS - 1 decode steps.
    started = time.perf_counter()
    llm.generate(batch_prompts, whole)
    total_s = time.perf_counter() - started
    decode_tokens = batch * (NEW_TOKENS - 1)
    return {
        "batch": batch,
        "prefill_s": round(prefill_s, 4),
        "decode_s": round(total_s, 4),
        "ms_per_token": round(1e3 * total_s / decode_tokens, 3),
        "ms_per_step": round(1e3 * total_s / (NEW_TOKENS - 1), 3),
        "tokens_per_s": round(decode_tokens / total_s, 2),
    }


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", default="1,4,8,11,16,32")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    torch.set_num_threads(args.threads)
    llm = LLM(model=None, dtype="float32", max_num_seqs=max(batches))
    decode_seconds_per_token(llm, 2)  # warm-up
    rows = []
    for batch in batches:
        row = decode_seconds_per_token(llm, batch)
        logger.info("%s", row)
        rows.append(row)
    largest = rows[-1]["ms_per_token"]
    for row in rows:
        row["cost_vs_largest_batch"] = round(row["ms_per_token"] / largest, 3)
    write_results(
        "decode_batch_cost",
        {
            "benchmark": "decode_batch_cost",
            "machine": machine_info(),
            "config": {
                "threads": args.threads,
                "prompt_tokens": PROMPT_TOKENS,
                "new_tokens": NEW_TOKENS,
                "dtype": "float32",
            },  # fmt: skip
            "rows": rows,
            "command": " ".join(["python", *sys.argv]),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
