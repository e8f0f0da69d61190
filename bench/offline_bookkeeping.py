"""The engine's own per-step work in ``LLM.generate`` at many concurrent requests: a tiny
llama (compute negligible), requests added straight to the engine and stepped to the end,
every-step outputs (what a streaming server reads) against finished-only outputs (what
``LLM.generate`` asks for), alternated in one process.

    python bench/offline_bookkeeping.py [--requests 256] [--tokens 64] [--rounds 5]

Writes ``bench/results/offline_bookkeeping.json``: ms per step of each round and their
medians.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from molink.engine.offline import LLM  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from tests.helpers.tiny_models import make_tiny_model  # noqa: E402


def ms_per_step(
    llm: LLM, prompts: list[list[int]], params: SamplingParams, finished_only: bool, ids
) -> float:
    for prompt in prompts:
        llm.engine.add_request(f"r{next(ids)}", prompt, params)
    started = time.perf_counter()
    done = 0
    while llm.engine.has_unfinished_requests():
        done += sum(o.finished for o in llm.engine.step(finished_only=finished_only))
    assert done == len(prompts)
    return (time.perf_counter() - started) * 1e3 / params.max_tokens


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_tiny_model("llama", Path(tmp) / "tiny-llama")
        llm = LLM(
            model=str(path),
            dtype="float32",
            max_model_len=256,
            max_num_seqs=args.requests,
            max_num_batched_tokens=4096,
            num_kv_blocks=4096,
        )
        prompts = [[(11 + 7 * (i * 16 + j)) % 384 for j in range(16)] for i in range(args.requests)]
        params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
        ids = itertools.count()
        ms_per_step(llm, prompts, params, True, ids)  # warm-up
        every, final = [], []
        for _ in range(args.rounds):
            every.append(round(ms_per_step(llm, prompts, params, False, ids), 2))
            final.append(round(ms_per_step(llm, prompts, params, True, ids), 2))
    write_results(
        "offline_bookkeeping",
        {
            "requests": args.requests,
            "tokens": args.tokens,
            "every_step_ms": every,
            "finished_only_ms": final,
            "median_every_step_ms": statistics.median(every),
            "median_finished_only_ms": statistics.median(final),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
