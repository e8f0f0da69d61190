"""One phase of ``bench/engine_loop_bench.py``: the head's engine loop with an instant
executor, from whichever ``molink`` is first on ``PYTHONPATH`` (this file adds nothing to
the path, so that the tree under test is the one imported). Prints one JSON line.

The executor computes nothing: every sampled token is a fixed function of the sequence and
its position, and ``poll`` hands back only the oldest result, so several plans stay in
flight. What is timed is the engine's and scheduler's own work per step (scheduling, plan
building, results, request state, detokenizing, outputs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import deque

import molink
from molink.config import SchedulerConfig
from molink.engine.llm_engine import LLMEngine
from molink.kv_cache.manager import KVCacheManager
from molink.sampling_params import SamplingParams
from molink.scheduler.scheduler import Scheduler
from molink.step import SampledToken, StepPlan, StepResult
from tests.helpers.fake_engine import EOS_ID, FakeTokenizer


class InstantExecutor:
    def __init__(self) -> None:
        self._pending: deque[StepResult] = deque()

    def submit(self, plan: StepPlan) -> None:
        sampled = tuple(
            SampledToken(s.seq_id, 40 + (s.seq_id * 7 + s.num_computed_tokens) % 60)
            for s in plan.scheduled
            if s.sample
        )
        self._pending.append(
            StepResult(step_id=plan.step_id, sampled=sampled, micro_batch=plan.micro_batch)
        )

    def poll(self, timeout: float) -> list[StepResult]:
        return [self._pending.popleft()] if self._pending else []

    def release(self, seq_ids: list[int]) -> None:
        pass

    def readiness(self) -> str | None:
        return None

    def close(self) -> None:
        self._pending.clear()


def run_once(args: argparse.Namespace) -> float:
    """Output tokens per second of CPU time of the engine loop for the whole workload (CPU
    time of this process, not wall time: the machine is shared, and time spent waiting for
    a core is not the loop's cost)."""
    config = SchedulerConfig(
        max_num_batched_tokens=args.batched_tokens, max_num_seqs=256, max_model_len=4096
    )
    scheduler = Scheduler(config, KVCacheManager(4096, 16, True), (EOS_ID,))
    engine = LLMEngine(scheduler, InstantExecutor(), FakeTokenizer(), args.micro_batches)
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True, n=args.n)
    start = time.process_time()
    for index in range(args.num_requests):
        prompt = [3 + (index * 13 + i) % 90 for i in range(args.prompt_len)]
        engine.add_request(f"r{index}", prompt, params)
    num_tokens = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            num_tokens += sum(len(choice.delta_token_ids) for choice in output.outputs)
    elapsed = time.process_time() - start
    expected = args.num_requests * args.n * args.output_len
    if num_tokens != expected:
        raise RuntimeError(f"streamed {num_tokens} tokens, expected {expected}")
    return num_tokens / elapsed


def calls_per_token(args: argparse.Namespace) -> float:
    """Python and C function calls per output token in one run: unlike time, a count that
    load on the machine cannot change."""
    calls = 0

    def count(frame: object, event: str, arg: object) -> None:
        nonlocal calls
        if event in ("call", "c_call"):
            calls += 1

    sys.setprofile(count)
    try:
        run_once(args)
    finally:
        sys.setprofile(None)
    return calls / (args.num_requests * args.n * args.output_len)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--n", type=int, default=1)
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--batched-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    run_once(args)  # warm-up
    rates = [run_once(args) for _ in range(args.repeats)]
    calls = calls_per_token(args)
    print(
        json.dumps(
            {
                "molink": molink.__file__,
                # The fastest run: a shared machine only ever slows a run down (as timeit).
                "tokens_per_s": max(rates),
                "median_tokens_per_s": statistics.median(rates),
                "calls_per_token": calls,
                "runs": rates,
            }
        )
    )


if __name__ == "__main__":
    main()
