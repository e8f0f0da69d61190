"""What a decode step of SmolLM2 Q4_1 costs at 1-8 rows in this tree and in an earlier one,
side by side: the Python and small-op overhead around the int4 kernel.

The earlier tree (``--base``) is exported from git (as ``bench/engine_loop_bench.py`` does);
each tree runs one ``bench/quant_step_worker.py`` process (offline engine, one torch
thread, ``--quantized-batch-kernel int4``), loaded once. Rounds alternate the trees ABBA;
for each row count a worker times ``--steps`` decode steps (median wall and CPU ms). The
ratio is the median over rounds of each round's paired ratio, since the shared host's
load drifts. Both trees must compute bit-identical logits (SHA-256 of every logit of the
timed steps): the run fails otherwise, unless ``--logits-may-differ`` (a change that
rounds differently on purpose), which reports whether logits and generated tokens are
identical per row count.

    OMP_NUM_THREADS=1 python bench/quant_step_overhead.py --base main [--rows 1,8]
        [--rounds 4] [--name quant_step_overhead]

Writes ``bench/results/<name>.json``. The committed run (``--base 34120aa --rounds 6
--rows 1,2,8``: the tree before the decode-overhead commits against the tree after them,
AMD EPYC, 2 cores shared, load average 3.6-4.0, so CPU ms are the steadier figures): per
decode step at 1, 2 and 8 rows, CPU ms 11.29 -> 10.88, 12.09 -> 11.75, 26.44 -> 25.82
(paired ratios 1.046x, 1.023x, 1.024x), function calls 5054 -> 4231, 5213 -> 4394,
6167 -> 5384; logits bit-identical. What remains at 1 row is mostly kernels: with the
int4 kernel stubbed out, a step costs ~3.0 ms of the ~10.4 (the LM head, a Q8_0 matrix
run as two int4 planes, ~3.5 ms of the kernels' ~7.3).

``quant_step_aligned.json`` (``--base 2440d67 --rounds 6 --rows 1,2,8``, both trees
restoring the model from their packed caches, quiet host): the tree whose cache files put
every tensor on a 64-byte boundary (molink/weights/aligned_safetensors.py) against the one
whose mapped tensors started 56 bytes past a cache line: per step at 1, 2 and 8 rows,
wall ms 12.59 -> 11.44, 14.18 -> 12.47, 27.95 -> 26.35 (paired ratios 1.11x, 1.14x,
1.05x); logits bit-identical. A first start, which multiplies the planes it has just
packed in (aligned) memory, does not show the difference: run the bench twice.

``quant_step_streamlined.json`` (``--base 8e3c451 --rounds 6 --rows 1,2,8``, load ~1):
the decode path with blocks calling ``forward()`` directly, attention's sizes and options
kept, torch's built-in binding of the int4 product, one-pass embedding rows of joined
planes and no runtime-protocol ``isinstance`` per forward, against the tree before: per
step at 1, 2 and 8 rows, wall ms 11.73 -> 10.95, 13.32 -> 12.35, 27.00 -> 25.81 (paired
ratios 1.065x, 1.077x, 1.050x), function calls 4510 -> 3150, 4680 -> 3320, 5741 -> 4365;
logits bit-identical. (A run before a last simplification, on a quieter host: 1.054x,
1.056x, 1.024x.)

``quant_step_direct.json`` (``--base 0c64bb6 --rounds 6 --rows 1,2,8``, load ~0.5): pre-norm
layers whose matrices are int4 planes running their forward without module dispatch
(molink/models/blocks/direct_decode.py) against the tree before: wall ms 10.28 -> 10.21,
11.59 -> 11.41, 24.49 -> 24.25 (paired ratios 1.019x, 1.020x, 1.015x), calls per step
3150 -> 2700, 3320 -> 2870, 4365 -> 3915; logits bit-identical.
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
from typing import IO, Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import write_results  # noqa: E402
from bench.swarm_overhead_bench import export_tree  # noqa: E402

logger = logging.getLogger("quant_step_overhead")
WORKER = Path(__file__).resolve().parent / "quant_step_worker.py"


class Worker:
    """A worker process on one tree, asked for one measurement at a time."""

    def __init__(self, tree: Path, steps: int, kernel: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), "--steps", str(steps), "--kernel", kernel],
            cwd=tree,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        ready = self._read()
        if not ready["molink"].startswith(str(tree / "molink")):
            raise RuntimeError(f"the worker imported {ready['molink']}, not the tree {tree}")

    def _read(self) -> dict[str, Any]:
        stdout: IO[str] | None = self.process.stdout
        assert stdout is not None
        line = stdout.readline()
        if not line:
            raise RuntimeError(f"worker exited with {self.process.wait()}")
        return json.loads(line)

    def measure(self, rows: int) -> dict[str, Any]:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{rows}\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        if self.process.stdin is not None:
            self.process.stdin.close()
        self.process.wait(timeout=60)


def summarize(runs: list[dict[str, Any]], rows: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for n in rows:
        mine = [r for r in runs if r["rows"] == n]
        entry: dict[str, Any] = {}
        for key in ("wall_ms", "cpu_ms"):
            for phase in ("now", "before"):
                values = [r[key] for r in mine if r["phase"] == phase]
                entry[f"{phase}_{key}"] = round(statistics.median(values), 3)
            ratios = []
            for round_index in sorted({r["round"] for r in mine}):
                pair = {p: 0.0 for p in ("now", "before")}
                for r in mine:
                    if r["round"] == round_index:
                        pair[r["phase"]] += r[key]
                ratios.append(pair["before"] / pair["now"])
            entry[f"speedup_{key}"] = round(statistics.median(ratios), 4)
        for phase in ("now", "before"):
            entry[f"{phase}_calls_per_step"] = next(
                r["calls_per_step"] for r in mine if r["phase"] == phase
            )
        out[str(n)] = entry
    return out


def compare_outputs(
    runs: list[dict[str, Any]], rows: list[int], may_differ: bool
) -> dict[str, Any]:
    """Whether the trees computed the same logits and tokens at each row count. Different
    logits fail the run unless ``may_differ`` (a change that rounds differently on purpose);
    the tokens are then reported, not required."""
    logits, tokens = {}, {}
    for n in rows:
        mine = [r for r in runs if r["rows"] == n]
        logits[str(n)] = len({r["logits_sha256"] for r in mine}) == 1
        tokens[str(n)] = len({r["tokens_sha256"] for r in mine}) == 1
        if not logits[str(n)] and not may_differ:
            raise RuntimeError(f"the trees' logits differ at {n} rows")
    return {
        "logits_bit_identical": all(logits.values()),
        "logits_identical_per_rows": logits,
        "tokens_identical_per_rows": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="main", help="git revision of 'before'")
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--kernel", default="int4")
    parser.add_argument("--name", default="quant_step_overhead")
    parser.add_argument(
        "--logits-may-differ",
        action="store_true",
        help="report (not fail on) logits that differ between the trees",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    rows = [int(n) for n in args.rows.split(",")]
    runs: list[dict[str, Any]] = []
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        base_commit = export_tree(args.base, Path(tmp))
        trees = {"now": REPO_ROOT, "before": Path(tmp) / "tree"}
        workers = {p: Worker(t, args.steps, args.kernel) for p, t in trees.items()}
        try:
            for round_index in range(args.rounds):
                order = ("now", "before") if round_index % 2 == 0 else ("before", "now")
                for n in rows:
                    for phase in order:
                        result = workers[phase].measure(n)
                        runs.append({"round": round_index, "phase": phase, "rows": n, **result})
                        logger.info("%s rows=%d: %s", phase, n, result)
                load.append(os.getloadavg()[0])
        finally:
            for worker in workers.values():
                worker.close()
    identical = compare_outputs(runs, rows, args.logits_may_differ)
    summary = summarize(runs, rows)
    logger.info("summary: %s", json.dumps(summary))
    write_results(
        args.name,
        {
            "base": {"revision": args.base, "commit": base_commit},
            "kernel": args.kernel,
            "steps": args.steps,
            "rounds": args.rounds,
            "load_average_1m": [round(x, 2) for x in load],
            **identical,
            "summary": summary,
            "runs": runs,
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
