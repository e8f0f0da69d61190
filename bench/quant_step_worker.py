"""One tree's side of ``bench/quant_step_overhead.py``: an offline engine on SmolLM2 Q4_1
(one torch thread), from whichever ``molink`` is first on ``PYTHONPATH`` (this file adds
nothing to the path, so that the tree under test is the one imported).

Reads one number per line on stdin (the rows of a decode batch) and answers one JSON line
per request: the median wall and CPU milliseconds of ``--steps`` decode steps at that many
rows, the tokens generated, and a SHA-256 of every logit those steps computed (so that two
trees can be checked to compute bit-identical logits, not only the same tokens).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

import molink
from molink.engine.offline import LLM
from molink.sampling_params import SamplingParams
from molink.weights import default_model_gguf

COUNTED_STEPS = 2
PROMPT = "Write a long story about a lighthouse keeper who finds a message in a bottle. Part"


class LogitDigest:
    """Wraps a slice's ``compute_logits``: every logits tensor goes into one SHA-256."""

    def __init__(self, model: Any) -> None:
        self.digest = hashlib.sha256()
        self._inner = model.compute_logits
        model.compute_logits = self

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self._inner(hidden)
        self.digest.update(logits.contiguous().numpy().tobytes())
        return logits


def count_calls(step: Callable[[], object], steps: int) -> float:
    """Python and C function calls per decode step: unlike time, a count that load on the
    machine cannot change."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        for _ in range(steps):
            step()
    finally:
        sys.setprofile(None)
    return calls / steps


def run(llm: LLM, digest: LogitDigest, rows: int, steps: int, tag: str) -> dict[str, Any]:
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=steps + COUNTED_STEPS + 3, ignore_eos=True)
    for i in range(rows):
        engine.add_request(f"{tag}-{i}", llm.tokenizer.encode(f"{PROMPT} {i + 1}:"), params)
    engine.step()  # prefill
    engine.step()  # a first decode step
    digest.digest = hashlib.sha256()
    wall, cpu = [], []
    tokens: dict[str, list[int]] = {}
    for _ in range(steps):
        w, c = time.perf_counter(), time.process_time()
        outputs = engine.step()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
        for out in outputs:
            index = out.request_id.rsplit("-", 1)[1]  # the same key in every round
            tokens.setdefault(index, []).extend(out.outputs[0].delta_token_ids)
    calls = count_calls(engine.step, COUNTED_STEPS)
    while engine.has_unfinished_requests():
        engine.step()
    return {
        "calls_per_step": calls,
        "wall_ms": round(statistics.median(wall) * 1e3, 3),
        "cpu_ms": round(statistics.median(cpu) * 1e3, 3),
        "logits_sha256": digest.digest.hexdigest(),
        "tokens_sha256": hashlib.sha256(json.dumps(sorted(tokens.items())).encode()).hexdigest(),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kernel", default="int4", help="--quantized-batch-kernel")
    args = parser.parse_args()
    torch.set_num_threads(1)
    llm = LLM(
        model=str(default_model_gguf()),
        quantization="gguf",
        quantized_batch_kernel=args.kernel,
        max_num_seqs=64,
        kv_cache_memory_bytes=1 << 28,
    )
    (stage,) = llm.engine.executor.stages
    digest = LogitDigest(stage.model)
    run(llm, digest, 2, 4, "warm")
    print(json.dumps({"molink": molink.__file__, "ready": True}), flush=True)
    for count, line in enumerate(sys.stdin):
        result = run(llm, digest, int(line), args.steps, f"r{count}")
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
