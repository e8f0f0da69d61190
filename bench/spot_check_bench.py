"""What spot checks cost: step latency and throughput at --molink-verify-fraction 0, 0.01,
0.1 (and 1 for scale), side by side in one run.

A swarm of threads in this process, every node a member (mutual TLS on loopback): the head
holds layer 0, three replicas serve layers [1, 2) and one node serves [2, 4). Stages are
the arithmetic toy executors with a fixed compute time per step (``--stage-ms``, sleeping,
so replicas compute in parallel as separate machines would). Each round starts
``--sequences`` greedy sequences in one prefill step, then runs ``--decode-steps`` decode
steps over all of them; one step in flight at a time, as a single micro-batch. Rounds of
the fractions alternate (ABCD ABCD ...), each with a fresh swarm.

    python bench/spot_check_bench.py [--rounds 3] [--sequences 64] [--decode-steps 24]

``--cost`` says what a stage's compute costs: ``per-pass`` (default) sleeps once per pass
of the compute thread, however many queued steps it computes together (a decode pass on
memory-bound hardware streams the weights once, so a node computing a step and its
re-runs together pays about one step), ``per-step`` once per step (the re-runs cost as
much as the step itself: an upper bound).

Writes ``bench/results/spot_checks.json`` (per-pass) or ``spot_checks_per_step.json``
(``vs_off`` compares means over rounds: at F = 0.01 most rounds check no sequence at all).
What it shows: users' steps are handed on as they arrive while their re-runs are judged
apart; every checked sequence adds two steps' work on other nodes and two re-runs on the
nodes the check routes share (counted); it does not show a real model's compute.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from molink.config import LayerRange  # noqa: E402
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode  # noqa: E402
from molink.pipeline.toy import ToyStageExecutor, expected_token, toy_identity  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from molink.security.credentials import SwarmCredentials  # noqa: E402
from molink.security.swarm_key import generate_swarm_key  # noqa: E402
from molink.step import NewSequenceData, ScheduledSequence, StepPlan  # noqa: E402
from molink.transport.config import TransportConfig  # noqa: E402

logger = logging.getLogger("spot_check_bench")

MODEL = toy_identity(4, vocab_size=1024)
FRACTIONS = (0.0, 0.01, 0.1, 1.0)
GREEDY = SamplingParams(temperature=0.0)


class CountingExecutor(ToyStageExecutor):
    """Counts the steps it computes (shadow ones included); sleeps per step."""

    steps = 0

    def execute(self, plan, hidden, head_id=""):
        self.steps += 1
        return super().execute(plan, hidden, head_id)


class PassCostExecutor(CountingExecutor):
    """Sleeps once per pass of the compute thread, whatever the steps it holds."""

    def execute_many(self, steps, head_id=""):
        time.sleep(self.delay_s)
        delay, self.delay_s = self.delay_s, 0.0
        try:
            return super().execute_many(steps, head_id)
        finally:
            self.delay_s = delay


def _member(key) -> TransportConfig:
    return TransportConfig(step_timeout_s=60.0, security=SwarmCredentials.from_key(key))


def _swarm(fraction: float, stage_s: float, cost: str):
    key = generate_swarm_key()
    config = _member(key)
    info = NodeInfo(config.security.node_id, MODEL, LayerRange(0, 1), "127.0.0.1:0")
    head = PipelineExecutor(
        ToyStageExecutor(LayerRange(0, 1), MODEL), info, config, verify_fraction=fraction
    ).start()
    nodes, executors = [], []
    for start, end in ((1, 2), (1, 2), (1, 2), (2, 4)):
        node_config = _member(key)
        kind = PassCostExecutor if cost == "per-pass" else CountingExecutor
        executor = kind(LayerRange(start, end), MODEL, delay_s=stage_s)
        node_info = NodeInfo(
            node_config.security.node_id, MODEL, LayerRange(start, end), "127.0.0.1:0"
        )
        nodes.append(StageNode(executor, node_info, node_config, initial_peer=head.address).start())
        executors.append(executor)
    deadline = time.monotonic() + 30
    while head.readiness() is not None or len(head.pipeline().stages) < 5:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the swarm did not form: {head.readiness()}")
        time.sleep(0.05)
    return head, nodes, executors


def _run_step(head: PipelineExecutor, plan: StepPlan) -> tuple[float, dict[int, int]]:
    started = time.perf_counter()
    head.submit(plan)
    while True:
        results = head.poll(1.0)
        if results:
            break
    elapsed = time.perf_counter() - started
    (result,) = results
    if result.error:
        raise RuntimeError(f"step {plan.step_id} failed: {result.error}")
    return elapsed, {s.seq_id: s.token_id for s in result.sampled}


def one_round(fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    head, nodes, executors = _swarm(fraction, args.stage_ms / 1000, args.cost)
    try:
        seqs = list(range(1, args.sequences + 1))
        prompt = (5, 6, 7, 8)
        n = len(prompt)
        plan = StepPlan(
            0,
            tuple(ScheduledSequence(s, 0, n, (), True) for s in seqs),
            prompt * len(seqs),
            tuple(NewSequenceData(s, prompt, n, GREEDY) for s in seqs),
        )
        latencies = []
        started = time.perf_counter()
        last = {s: prompt[-1] for s in seqs}
        for step in range(args.decode_steps + 1):
            elapsed, tokens = _run_step(head, plan)
            latencies.append(elapsed)
            for s in seqs:
                if tokens[s] != expected_token(last[s], s, 4, 1024):
                    raise RuntimeError(f"sequence {s} got a wrong token at step {step}")
            last = tokens
            plan = StepPlan(
                step + 1,
                tuple(ScheduledSequence(s, n + step, 1, (), True) for s in seqs),
                tuple(tokens[s] for s in seqs),
            )
        wall = time.perf_counter() - started
        head.release(seqs)
        decode = sorted(latencies[1:])
        return {
            "fraction": fraction,
            "tokens_per_s": len(seqs) * len(latencies) / wall,
            "decode_step_p50_ms": 1000 * statistics.median(decode),
            "decode_step_p99_ms": 1000 * decode[min(len(decode) - 1, int(0.99 * len(decode)))],
            "replica_steps": [e.steps for e in executors[:3]],
            "steps_on_routes": len(latencies),
            "checked_steps": _checked_steps(head.metric_lines()),
            "bans": sum(1 for m in head.metric_lines() if m.startswith("molink_node_banned{")),
        }
    finally:
        for node in nodes:
            node.stop()
        head.close()


def _checked_steps(lines: list[str]) -> int:
    """Steps compared (three pairs each, with two check routes)."""
    pairs = sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("molink_spot_checks_total")
    )
    return round(pairs / 3)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--decode-steps", type=int, default=24)
    parser.add_argument("--stage-ms", type=float, default=20.0)
    parser.add_argument("--cost", choices=("per-pass", "per-step"), default="per-pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rounds: dict[str, list[dict[str, Any]]] = {str(f): [] for f in FRACTIONS}
    for index in range(args.rounds):
        for fraction in FRACTIONS:
            row = one_round(fraction, args)
            rounds[str(fraction)].append(row)
            print(f"round {index} F={fraction}: {row}", flush=True)
    keys = ("tokens_per_s", "decode_step_p50_ms", "decode_step_p99_ms", "checked_steps")
    median = {
        f: {k: statistics.median(r[k] for r in rows) for k in keys} for f, rows in rounds.items()
    }
    # At F = 0.01 most rounds check nothing: the mean over rounds is the expected cost.
    mean = {
        f: {k: statistics.fmean(r[k] for r in rows) for k in keys} for f, rows in rounds.items()
    }
    base = mean["0.0"]
    relative = {
        f: {
            "throughput_vs_off": m["tokens_per_s"] / base["tokens_per_s"],
            "decode_p50_extra_ms": m["decode_step_p50_ms"] - base["decode_step_p50_ms"],
        }
        for f, m in mean.items()
    }
    write_results(
        "spot_checks" if args.cost == "per-pass" else "spot_checks_per_step",
        {
            "command": "python bench/spot_check_bench.py " + " ".join(argv or sys.argv[1:]),
            "setup": {
                "nodes": "head [0,1); 3 replicas of [1,2); one node [2,4); toy stages",
                "stage_ms": args.stage_ms,
                "cost": args.cost,
                "sequences": args.sequences,
                "decode_steps": args.decode_steps,
            },
            "rounds": rounds,
            "median": median,
            "mean": mean,
            "vs_off": relative,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
