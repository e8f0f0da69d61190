"""What spot checks cost: throughput and time per output token at --molink-verify-fraction
0, 0.01, 0.1 (and 1 for scale), side by side in one run.

A swarm of threads in this process, every node a member (mutual TLS on loopback): the head
holds layer 0, three replicas serve layers [1, 2) and one node serves [2, 4). Stages are
the arithmetic toy executors with a fixed compute time per step (``--stage-ms``, sleeping,
so replicas compute in parallel as separate machines would). Each round puts
``--sequences`` greedy requests of ``--output-len`` tokens into the head's engine loop (the
scheduler and engine the server runs, three micro-batches in flight) and runs them to the end;
every token is checked against what one process gives. Rounds of the fractions alternate
(ABCD ABCD ...), each with a fresh swarm.

    python bench/spot_check_bench.py [--rounds 3] [--sequences 64] [--output-len 25]

``--cost`` says what a stage's compute costs: ``per-pass`` (default) sleeps once per pass
of the compute thread, however many queued steps it computes together (a decode pass on
memory-bound hardware streams the weights once, so a node computing a step and its
re-runs together pays about one step), ``per-step`` once per step (the re-runs cost as
much as the step itself: an upper bound).

Writes ``bench/results/spot_checks.json`` (per-pass) or ``spot_checks_per_step.json``
(``vs_off`` compares means over rounds: at F = 0.01 most rounds check no sequence at all).
What it shows: a checked sequence's tokens wait for their verdict (its re-runs and the
next node's witness answer) while the other sequences go on; every checked sequence adds
two steps' work on other nodes and two re-runs on the nodes the check routes share
(counted); it does not show a real model's compute.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from molink.config import LayerRange, SchedulerConfig  # noqa: E402
from molink.engine.llm_engine import LLMEngine  # noqa: E402
from molink.kv_cache.manager import KVCacheManager  # noqa: E402
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode  # noqa: E402
from molink.pipeline.toy import ToyStageExecutor, expected_token, toy_identity  # noqa: E402
from molink.sampling_params import SamplingParams  # noqa: E402
from molink.scheduler.scheduler import Scheduler  # noqa: E402
from molink.security.credentials import SwarmCredentials  # noqa: E402
from molink.security.swarm_key import generate_swarm_key  # noqa: E402
from molink.transport.config import TransportConfig  # noqa: E402
from tests.helpers.fake_engine import FakeTokenizer  # noqa: E402

logger = logging.getLogger("spot_check_bench")

MODEL = toy_identity(4, vocab_size=1024)
FRACTIONS = (0.0, 0.01, 0.1, 1.0)
PROMPT = [5, 6, 7, 8]
BLOCK_SIZE = 16
KV = (4096, BLOCK_SIZE)  # every node's KV blocks: room for all sequences on any route
# The head spreads new sequences over the three routes (one per replica of [1, 2)); one
# micro-batch per route keeps each busy, as the server's micro-batch controller would.
MICRO_BATCHES = 3


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
    info = NodeInfo(config.security.node_id, MODEL, LayerRange(0, 1), "127.0.0.1:0", *KV)
    head = PipelineExecutor(
        ToyStageExecutor(LayerRange(0, 1), MODEL), info, config, verify_fraction=fraction
    ).start()
    nodes, executors = [], []
    for start, end in ((1, 2), (1, 2), (1, 2), (2, 4)):
        node_config = _member(key)
        kind = PassCostExecutor if cost == "per-pass" else CountingExecutor
        executor = kind(LayerRange(start, end), MODEL, delay_s=stage_s)
        node_info = NodeInfo(
            node_config.security.node_id, MODEL, LayerRange(start, end), "127.0.0.1:0", *KV
        )
        nodes.append(StageNode(executor, node_info, node_config, initial_peer=head.address).start())
        executors.append(executor)
    deadline = time.monotonic() + 30
    while head.readiness() is not None or len(head.pipeline().stages) < 5:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the swarm did not form: {head.readiness()}")
        time.sleep(0.05)
    return head, nodes, executors


def _engine(head: PipelineExecutor, sequences: int, output_len: int) -> LLMEngine:
    max_len = len(PROMPT) + output_len
    config = SchedulerConfig(
        max_num_batched_tokens=max(256, sequences * len(PROMPT)),
        max_num_seqs=sequences,
        max_model_len=max_len,
    )
    blocks = sequences * (-(-max_len // BLOCK_SIZE)) + 8
    scheduler = Scheduler(config, KVCacheManager(blocks, BLOCK_SIZE, False), ())
    return LLMEngine(
        scheduler,
        head,
        FakeTokenizer(),
        num_micro_batches=MICRO_BATCHES,
        router=head.routes,
        recovery=head,
    )


def _drive(engine: LLMEngine, sequences: int, output_len: int) -> dict[int, float]:
    """Run ``sequences`` requests to their end as the server's loop does; returns each
    sequence's time per output token (s)."""
    greedy = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True)
    for index in range(sequences):
        engine.add_request(f"r{index}", PROMPT, greedy)  # sequence id = index
    finished = {}
    deadline = time.monotonic() + 600
    while engine.has_unfinished_requests():
        if time.monotonic() > deadline:
            raise RuntimeError("the requests did not finish in 600 s")
        busy = engine.num_in_flight >= engine.num_micro_batches
        for output in engine.step(poll_timeout=0.05 if busy else 0.002):
            if output.outputs[0].error:
                raise RuntimeError(f"{output.request_id} failed: {output.outputs[0].error}")
            if output.finished:
                finished[output.request_id] = output
    tpots = {}
    for index in range(sequences):
        output = finished[f"r{index}"]
        tokens = [PROMPT[-1]]
        for _ in range(output_len):
            tokens.append(expected_token(tokens[-1], index, 4, 1024))
        if output.outputs[0].token_ids != tokens[1:]:
            raise RuntimeError(f"sequence {index} got wrong tokens")
        metrics = output.metrics
        tpots[index] = (metrics.finished_time - metrics.first_token_time) / (output_len - 1)
    return tpots


def one_round(fraction: float, args: argparse.Namespace) -> dict[str, Any]:
    head, nodes, executors = _swarm(fraction, args.stage_ms / 1000, args.cost)
    try:
        engine = _engine(head, args.sequences, args.output_len)
        checked: set[int] = set()  # sequences whose tokens were held for a verdict
        take_verdicts = head.take_verdicts

        def noting_verdicts():
            verdicts = take_verdicts()
            checked.update(v.seq_id for v in verdicts)
            return verdicts

        head.take_verdicts = noting_verdicts  # the engine reads verdicts through it
        started = time.perf_counter()
        tpots = _drive(engine, args.sequences, args.output_len)
        wall = time.perf_counter() - started
        unchecked = [t for s, t in tpots.items() if s not in checked]
        lines = head.metric_lines()
        return {
            "fraction": fraction,
            "tokens_per_s": args.sequences * args.output_len / wall,
            "tpot_p50_ms": 1000 * statistics.median(tpots.values()),
            "tpot_unchecked_p50_ms": 1000 * statistics.median(unchecked) if unchecked else None,
            "tpot_checked_mean_ms": (
                1000 * statistics.fmean(tpots[s] for s in checked) if checked else None
            ),
            "checked_sequences": len(checked),
            "engine_steps": engine.num_steps,
            "replica_steps": [e.steps for e in executors[:3]],
            "checked_steps": _checked_steps(lines),
            "held_tokens": _counter(lines, "molink_spot_check_held_tokens_total"),
            "bans": sum(1 for m in lines if m.startswith("molink_node_banned{")),
        }
    finally:
        for node in nodes:
            node.stop()
        head.close()


def _counter(lines: list[str], name: str) -> int:
    return round(sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name)))


def _checked_steps(lines: list[str]) -> int:
    """Steps compared (three pairs each, with two check routes)."""
    pairs = sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("molink_spot_checks_total")
    )
    return round(pairs / 3)


def _summary(rows: list[dict[str, Any]], keys: tuple[str, ...], how) -> dict[str, Any]:
    """``how`` (median, mean) of each key over the rounds that have it (a round with no
    checked sequence has no checked time per token)."""
    summary = {}
    for key in keys:
        values = [r[key] for r in rows if r[key] is not None]
        summary[key] = how(values) if values else None
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=25)
    parser.add_argument("--stage-ms", type=float, default=20.0)
    parser.add_argument("--cost", choices=("per-pass", "per-step"), default="per-pass")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()
    rounds: dict[str, list[dict[str, Any]]] = {str(f): [] for f in FRACTIONS}
    for index in range(args.rounds):
        for fraction in FRACTIONS:
            row = one_round(fraction, args)
            rounds[str(fraction)].append(row)
            print(f"round {index} F={fraction}: {row}", flush=True)
    keys = (
        "tokens_per_s",
        "tpot_p50_ms",
        "tpot_unchecked_p50_ms",
        "tpot_checked_mean_ms",
        "checked_sequences",
        "checked_steps",
        "held_tokens",
    )
    # At F = 0.01 most rounds check nothing: the mean over rounds is the expected cost.
    median = {f: _summary(rows, keys, statistics.median) for f, rows in rounds.items()}
    mean = {f: _summary(rows, keys, statistics.fmean) for f, rows in rounds.items()}
    base = mean["0.0"]
    relative = {
        f: {
            "throughput_vs_off": m["tokens_per_s"] / base["tokens_per_s"],
            "tpot_unchecked_p50_vs_off": (
                m["tpot_unchecked_p50_ms"] / base["tpot_unchecked_p50_ms"]
                if m["tpot_unchecked_p50_ms"] is not None
                else None  # every sequence was checked
            ),
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
                "output_len": args.output_len,
                "micro_batches": MICRO_BATCHES,
            },
            "load_average_1_5_15": {"before": load_before, "after": os.getloadavg()},
            "rounds": rounds,
            "median": median,
            "mean": mean,
            "vs_off": relative,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
