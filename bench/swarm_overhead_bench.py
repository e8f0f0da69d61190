"""What the swarm machinery costs one route: the same two-stage loopback pipeline, served by
this tree and by the tree before stages owned their KV and routes travelled with steps.

The earlier tree is exported from git (``git archive`` of ``--base``, by default the parent
of the commit that brought stage-owned KV and routes) into a temporary folder; each phase
starts a head ``[0, split)`` and a stage ``[split, 30)`` of SmolLM2 (the default model), one
torch thread each, from one tree or the other (the server runs with that folder as its
working directory and first on its path), warms up and runs the same fixed workload as
``bench/pipeline_bench.py``. ``now`` runs with every default (the swarm's DHT included);
``--dht-off`` adds a phase ``now-dht-off`` of this tree with ``--molink-dht off``.

The machine's load drifts, so phases interleave: each round runs them forward then
backward (A B B A, or A B C C B A), and the summary gives each phase's median with its
spread (min, max), the median of the per-round ratios against ``before`` with their
range, and two figures that other processes' load disturbs less than wall-clock
throughput: the servers' own CPU seconds per output token, and the time to start.

    python bench/swarm_overhead_bench.py [--base cc0d939^] [--rounds 2] [--dht-off] [--quick]

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
import time
from collections.abc import Callable, Iterator, Sequence
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
def running_pipeline(
    name: str, tree: Path, config: BenchConfig, extra_args: Sequence[str] = ()
) -> Iterator[Phase]:
    phase = Phase(name, [], [])
    try:
        for command, port, threads in pipeline_commands(config, None):
            command = [*command, *extra_args]
            phase.commands.append(command)
            phase.servers.append(start_in(tree, command, port, threads))
            wait_answering(phase.servers[-1], config.startup_timeout_s)
        wait_for_health(phase.servers[0], config.startup_timeout_s)
        yield phase
    finally:
        for server in reversed(phase.servers):
            stop_server(server)


# phase -> (which tree, extra flags for both nodes)
PHASES: dict[str, tuple[str, tuple[str, ...]]] = {
    "now": ("now", ()),
    "before": ("before", ()),
    "now-dht-off": ("now", ("--molink-dht", "off")),
}


def run_phase(name: str, trees: dict[str, Path], config: BenchConfig) -> dict[str, Any]:
    tree, extra_args = PHASES[name]
    started = time.monotonic()
    with running_pipeline(name, trees[tree], config, extra_args) as phase:
        startup_s = time.monotonic() - started
        result = asyncio.run(measure(phase, config))
    logger.info(
        "%s: %.2f output tokens/s, started in %.1f s", name, _tokens_per_s(result), startup_s
    )
    return {"phase": name, "startup_s": startup_s, **result}


def _tokens_per_s(result: dict[str, Any]) -> float:
    return float(result["summary"]["output_throughput"])


def _cpu_s_per_token(result: dict[str, Any]) -> float | None:
    """The servers' own CPU seconds per output token (None if not readable here)."""
    cpu = result.get("cpu_seconds_per_server") or []
    tokens = result.get("generated_tokens") or 0
    if not cpu or any(c is None for c in cpu) or not tokens:
        return None
    return sum(cpu) / tokens


def _spread(values: list[float]) -> dict[str, float | int]:
    return {
        "n": len(values),
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    phases = sorted({r["phase"] for r in runs}, key=list(PHASES).index)
    per_phase: dict[str, Any] = {}
    for name in phases:
        mine = [r for r in runs if r["phase"] == name]
        cpu = [c for c in map(_cpu_s_per_token, mine) if c is not None]
        per_phase[name] = {
            "output_tokens_per_s": _spread([_tokens_per_s(r) for r in mine]),
            "server_cpu_s_per_output_token": _spread(cpu) if cpu else None,
            "startup_s": _spread([r["startup_s"] for r in mine]),
        }
    ratios = {name: _round_ratios(runs, name) for name in phases if name != "before"}
    cpu_ratios = {
        name: _round_ratios(runs, name, _cpu_s_per_token) for name in phases if name != "before"
    }
    median = {n: per_phase[n]["output_tokens_per_s"]["median"] for n in phases}
    ratio = median["now"] / median["before"]
    return {
        "phases": per_phase,
        "now_vs_before": round(ratio, 4),
        "round_ratios_vs_before": ratios,
        # Server CPU seconds per output token over ``before``'s, per round (1.03: 3% more
        # CPU per token): other processes' load disturbs it far less than tokens/s.
        "cpu_per_token_round_ratios_vs_before": cpu_ratios,
        "load_average_1m": _spread([r["loadavg_before"][0] for r in runs if "loadavg_before" in r])
        if any("loadavg_before" in r for r in runs)
        else None,
        "target": TARGET_RATIO,
        "meets_target": ratio >= TARGET_RATIO,
    }


def _round_ratios(
    runs: list[dict[str, Any]],
    name: str,
    figure: Callable[[dict[str, Any]], float | None] = _tokens_per_s,
) -> dict[str, Any]:
    """Within each round, the phase's mean ``figure`` (tokens/s by default) over
    ``before``'s (both ran in the same stretch of time, so the drift of the machine's load
    largely cancels)."""
    values = []
    for index in sorted({r["round"] for r in runs}):
        in_round = [r for r in runs if r["round"] == index]
        mine = [v for r in in_round if r["phase"] == name and (v := figure(r)) is not None]
        base = [v for r in in_round if r["phase"] == "before" and (v := figure(r)) is not None]
        if mine and base:
            values.append(statistics.fmean(mine) / statistics.fmean(base))
    return {"per_round": [round(v, 4) for v in values], **_spread(values)} if values else {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=DEFAULT_BASE, help="git revision of 'before'")
    parser.add_argument("--rounds", type=int, default=2, help="forward-backward groups")
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dht-off", action="store_true", help="also this tree without a DHT")
    parser.add_argument("--quick", action="store_true", help="8 requests of 16 tokens")
    parser.add_argument("--name", default="swarm_overhead")
    args = parser.parse_args(argv)
    config = replace(BenchConfig(), num_requests=args.num_requests, output_len=args.output_len)
    if args.quick:
        args.rounds = 1
        config = replace(config, num_requests=8, output_len=16)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    phases = ["now", "before", *(["now-dht-off"] if args.dht_off else [])]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        base_commit = export_tree(args.base, Path(tmp))
        trees = {"now": REPO_ROOT, "before": Path(tmp) / "tree"}
        for round_index in range(args.rounds):
            # Rounds start from alternate ends, so no phase always runs first.
            order = phases if round_index % 2 == 0 else phases[::-1]
            for name in (*order, *reversed(order)):
                runs.append({"round": round_index, **run_phase(name, trees, config)})
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
