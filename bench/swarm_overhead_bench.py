"""What the swarm machinery costs one route: the same two-stage loopback pipeline, served by
this tree and by the tree before stages owned their KV and routes travelled with steps.

The earlier tree is exported from git (``git archive`` of ``--base``, by default the parent
of the commit that brought stage-owned KV and routes) into a temporary folder; each phase
starts a head ``[0, split)`` and a stage ``[split, 30)`` of SmolLM2 (the default model), one
torch thread each, from one tree or the other (the server runs with that folder as its
working directory and first on its path), warms up and runs the same fixed workload as
``bench/pipeline_bench.py``. Phases alternate ABBA (``--rounds`` groups of four), since the
machine's load drifts; the ratio compares median output tokens per second.

    python bench/swarm_overhead_bench.py [--base cc0d939^] [--rounds 1] [--quick]

Writes ``bench/results/swarm_overhead.json``. Target: ``now`` within 3% of ``before``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import ServerProcess, stop_server, wait_for_health, write_results  # noqa: E402
from bench.pipeline_bench import (  # noqa: E402
    BenchConfig,
    Phase,
    measure,
    pipeline_commands,
    wait_answering,
)

logger = logging.getLogger("swarm_overhead_bench")

DEFAULT_BASE = "cc0d939^"
TARGET_RATIO = 0.97


def export_tree(revision: str, into: Path) -> str:
    """Writes ``revision``'s files under ``into``; returns its full commit id."""
    commit = subprocess.run(
        ["git", "rev-parse", revision], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    archive = into / "tree.tar"
    subprocess.run(
        ["git", "archive", "--format=tar", "-o", str(archive), commit], cwd=REPO_ROOT, check=True
    )
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    archive.unlink()
    return commit


def start_in(tree: Path, command: list[str], port: int, threads: int) -> ServerProcess:
    """A server whose ``molink`` package is the one in ``tree`` (``-m`` puts the working
    directory first on the path, ahead of the installed package)."""
    log = tempfile.NamedTemporaryFile(prefix="bench-server-", suffix=".log", delete=False)
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    process = subprocess.Popen(
        command, cwd=tree, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    log.close()
    return ServerProcess(process, port, Path(log.name))


@contextlib.contextmanager
def running_pipeline(name: str, tree: Path, config: BenchConfig) -> Iterator[Phase]:
    phase = Phase(name, [], [])
    try:
        for command, port, threads in pipeline_commands(config, None):
            phase.commands.append(command)
            phase.servers.append(start_in(tree, command, port, threads))
            wait_answering(phase.servers[-1], config.startup_timeout_s)
        wait_for_health(phase.servers[0], config.startup_timeout_s)
        yield phase
    finally:
        for server in reversed(phase.servers):
            stop_server(server)


def run_phase(name: str, tree: Path, config: BenchConfig) -> dict[str, Any]:
    with running_pipeline(name, tree, config) as phase:
        result = asyncio.run(measure(phase, config))
    logger.info("%s: %.2f output tokens/s", name, _tokens_per_s(result))
    return {"phase": name, **result}


def _tokens_per_s(result: dict[str, Any]) -> float:
    return float(result["summary"]["output_throughput"])


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    medians = {
        name: statistics.median(_tokens_per_s(r) for r in runs if r["phase"] == name)
        for name in ("now", "before")
    }
    ratio = medians["now"] / medians["before"]
    return {
        "median_output_tokens_per_s": medians,
        "now_vs_before": round(ratio, 4),
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help="git revision of 'before'")
    parser.add_argument("--rounds", type=int, default=1, help="ABBA groups of four runs")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--quick", action="store_true", help="8 requests of 16 tokens")
    parser.add_argument("--name", default="swarm_overhead")
    args = parser.parse_args(argv)
    config = replace(BenchConfig(), num_requests=args.num_requests, output_len=args.output_len)
    if args.quick:
        args.rounds = 1
        config = replace(config, num_requests=8, output_len=16)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base_commit = export_tree(args.base, Path(tmp))
        trees = {"now": REPO_ROOT, "before": Path(tmp) / "tree"}
        for round_index in range(args.rounds):
            order = ("now", "before") if round_index % 2 == 0 else ("before", "now")
            for name in (*order, *reversed(order)):
                runs.append({"round": round_index, **run_phase(name, trees[name], config)})
    write_results(
        args.name,
        {
            "config": asdict(config),
            "before_commit": base_commit,
            "runs": runs,
            "summary": summarize(runs),
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
