"""Routing over two replicas behind different links, measured: both up vs each alone.

A head ``[0, 2)`` in this process and replicas of the tail ``[2, 6)`` as toy stage processes
(``molink.pipeline.toy``, hidden size 1024 in float16, a fixed fake compute per step), each
behind its own link emulator: ``fast`` at 1 Gbit/s and 1 ms round trip, ``slow`` at
20 Mbit/s and 50 ms. Modes, in one run, interleaved over ``--rounds``:

* ``both``: both replicas up, the head's router chooses per sequence;
* ``fast-only`` and ``slow-only``: one replica up.

Each mode starts its own swarm and runs ``--sequences`` sequences, ``--in-flight`` at a time
(one micro-batch each): a prefill of ``--prompt-tokens`` then ``--decode-steps`` decodes.
Recorded per run: generated tokens per second, TPOT p50/p99 (gaps between a sequence's
tokens), TTFT p50, and the sequences each route took.

    python bench/swarm_routing_bench.py [--rounds 2] [--sequences 32] [--quick]

Writes ``bench/results/swarm_routing.json``. Expectation: ``both`` within 10% of
``fast-only`` in throughput, far above ``slow-only``, and most sequences over ``fast``.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from molink.netem import LinkSpec  # noqa: E402
from tests.integration.swarm_netem import ReplicaSwarm  # noqa: E402

logger = logging.getLogger("swarm_routing_bench")

LINKS = {
    "fast": LinkSpec.from_rtt(rate_mbit=1000, rtt_ms=1),
    "slow": LinkSpec.from_rtt(rate_mbit=20, rtt_ms=50),
}
MODES = {"both": ("fast", "slow"), "fast-only": ("fast",), "slow-only": ("slow",)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_mode(mode: str, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    swarm = ReplicaSwarm(log_dir).start()
    try:
        for node_id in MODES[mode]:
            swarm.spawn_replica(node_id, LINKS[node_id], delay_s=args.stage_delay)
        swarm.wait_measured(set(MODES[mode]))
        swarm.run_sequences(args.in_flight, args.prompt_tokens, args.decode_steps, args.in_flight)
        warm = swarm.route_choices()
        started = time.monotonic()
        timeline = swarm.run_sequences(
            args.sequences, args.prompt_tokens, args.decode_steps, args.in_flight
        )
        elapsed = time.monotonic() - started
        choices = swarm.route_choices()
    finally:
        swarm.close()
    gaps = [gap for _, seq_gaps in timeline for gap in seq_gaps]
    tokens = args.sequences * (1 + args.decode_steps)
    return {
        "mode": mode,
        "elapsed_s": round(elapsed, 3),
        "output_tokens": tokens,
        "output_tokens_per_s": round(tokens / elapsed, 2),
        "tpot_p50_ms": round(percentile(gaps, 50) * 1e3, 2),
        "tpot_p99_ms": round(percentile(gaps, 99) * 1e3, 2),
        "ttft_p50_ms": round(statistics.median(t for t, _ in timeline) * 1e3, 2),
        "sequences_by_route": {k: v - warm.get(k, 0) for k, v in choices.items()},
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in MODES:
        mine = [r for r in runs if r["mode"] == mode]
        summary[mode] = {
            key: statistics.median(r[key] for r in mine)
            for key in ("output_tokens_per_s", "tpot_p50_ms", "tpot_p99_ms", "ttft_p50_ms")
        }
    fast, both = summary["fast-only"], summary["both"]
    summary["both_vs_fast_throughput"] = round(
        both["output_tokens_per_s"] / fast["output_tokens_per_s"], 3
    )
    summary["both_vs_slow_throughput"] = round(
        both["output_tokens_per_s"] / summary["slow-only"]["output_tokens_per_s"], 3
    )
    both_routes: dict[str, int] = {}
    for run in runs:
        if run["mode"] == "both":
            for key, count in run["sequences_by_route"].items():
                both_routes[key] = both_routes.get(key, 0) + count
    summary["both_sequences_by_route"] = both_routes
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--decode-steps", type=int, default=16)
    parser.add_argument("--stage-delay", type=float, default=0.005, help="fake compute, s/step")
    parser.add_argument("--quick", action="store_true", help="1 round of 8 sequences")
    parser.add_argument("--name", default="swarm_routing")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.sequences = 1, 8
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = list(MODES) if round_index % 2 == 0 else list(reversed(MODES))
            for mode in order:
                run = run_mode(mode, args, Path(tmp))
                logger.info("round %d %s: %s", round_index, mode, run)
                runs.append({"round": round_index, **run})
    config = {k: v for k, v in vars(args).items() if k != "name"}
    links = {k: {"rate_mbit": v.rate_mbit, "delay_ms": v.delay_s * 1e3} for k, v in LINKS.items()}
    write_results(
        args.name, {"config": config, "links": links, "runs": runs, "summary": summarize(runs)}
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
