"""What the head's own bookkeeping costs per token: the engine loop with an instant executor
(``bench/engine_loop_worker.py``), served by this tree and by an earlier one, side by side.

The earlier tree (``--base``, by default the parent of the commit that gave each sequence's
tokens and the plans in flight one owner) is exported from git as in
``bench/swarm_overhead_bench.py``; each phase is one worker process per tree, alternating
ABBA over ``--rounds`` groups of four, since the machine's load drifts. Two workloads: 64
requests with K=4 plans in flight (decodes chunked by a 32-token budget), and 16 requests
of n=4 sequences. A worker's rate is its fastest of ``--repeats`` runs, in output tokens
per second of its CPU time (load on a shared machine only slows runs down); the ratio is
the median over rounds of each round's now/before ratio. Since a shared machine's load
moves these by more than the 3% target, each worker also counts the function calls per
output token of one run (``sys.setprofile``), which load cannot change.

    python bench/engine_loop_bench.py [--base 37ed31a^] [--rounds 3]

Writes ``bench/results/engine_loop.json``. Nothing may get slower: target ``now`` within
3% of ``before``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from bench.swarm_overhead_bench import export_tree  # noqa: E402

logger = logging.getLogger("engine_loop_bench")

DEFAULT_BASE = "37ed31a^"
TARGET_RATIO = 0.97
WORKER = Path(__file__).resolve().parent / "engine_loop_worker.py"
WORKLOADS: dict[str, list[str]] = {
    "k4": ["--num-requests", "64", "--micro-batches", "4", "--batched-tokens", "32"],
    "n4": ["--num-requests", "16", "--n", "4", "--micro-batches", "1", "--batched-tokens", "256"],
}


def run_worker(tree: Path, workload: list[str], repeats: int) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(WORKER), *workload, "--repeats", str(repeats)],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(done.stdout.strip().splitlines()[-1])
    expected = str(tree / "molink")
    if not result["molink"].startswith(expected):
        raise RuntimeError(f"the worker imported {result['molink']}, not the tree {tree}")
    return result


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per workload: the median of each tree's rates, and the median over rounds of each
    round's ratio (the two trees of one round ran within seconds of each other, under
    much the same load, so the paired ratio is the steadier figure)."""
    summary: dict[str, Any] = {}
    for workload in WORKLOADS:
        mine = [r for r in runs if r["workload"] == workload]
        medians = {
            phase: statistics.median(r["tokens_per_s"] for r in mine if r["phase"] == phase)
            for phase in ("now", "before")
        }
        ratios = []
        for round_index in sorted({r["round"] for r in mine}):
            pair = {"now": 0.0, "before": 0.0}
            for r in mine:
                if r["round"] == round_index:
                    pair[r["phase"]] += r["tokens_per_s"]
            ratios.append(pair["now"] / pair["before"])
        ratio = statistics.median(ratios)
        calls = {
            phase: next(r["calls_per_token"] for r in mine if r["phase"] == phase)
            for phase in ("now", "before")
        }
        summary[workload] = {
            "function_calls_per_token": {k: round(v, 2) for k, v in calls.items()},
            "median_output_tokens_per_s": {k: round(v, 1) for k, v in medians.items()},
            "round_ratios": [round(x, 4) for x in ratios],
            "now_vs_before": round(ratio, 4),
            "meets_target": ratio >= TARGET_RATIO,
        }
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help="git revision of 'before'")
    parser.add_argument("--rounds", type=int, default=8, help="ABBA groups of four runs")
    parser.add_argument("--repeats", type=int, default=8, help="workloads per worker")
    parser.add_argument("--name", default="engine_loop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base_commit = export_tree(args.base, Path(tmp))
        trees = {"now": REPO_ROOT, "before": Path(tmp) / "tree"}
        for round_index in range(args.rounds):
            for phase in ("now", "before", "before", "now"):
                for workload, flags in WORKLOADS.items():
                    result = run_worker(trees[phase], flags, args.repeats)
                    runs.append(
                        {"round": round_index, "phase": phase, "workload": workload, **result}
                    )
                    logger.info("%s %s: %.0f tokens/s", phase, workload, result["tokens_per_s"])
    for run in runs:
        run.pop("molink")
    summary = summarize(runs)
    logger.info("summary: %s", json.dumps(summary))
    write_results(
        args.name,
        {
            "base": {"revision": args.base, "commit": base_commit},
            "workloads": WORKLOADS,
            "target": TARGET_RATIO,
            "summary": summary,
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
