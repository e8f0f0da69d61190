"""A two-stage pipeline on loopback against one process: does pipelining pay on one machine?

SmolLM2 (the default model), a fixed workload (token-id prompts, ``--output-len`` new tokens
each with ``ignore_eos``, all ``--num-requests`` at once, streamed), in one run:

* ``single``: one ``molink serve --num-threads 2``;
* ``pipeline``: head ``[0, split)`` + stage ``[split, 30)``, ``--num-threads 1`` each,
  micro-batches in flight as the head chooses by default;
* ``pipeline-k3``: the same, pinned to stages + 1 = 3 micro-batches;
* ``pipeline-k1``: the same, one micro-batch in flight (no pipelining);
* ``pipeline-k2`` (only when asked for with ``--phases``): pinned to 2.

Each phase starts its own servers, warms up, runs the workload once, and records the
load generator's summary (tokens/s, TTFT and TPOT percentiles), bytes on the wire per
generated token (the head's ``molink:pipeline_bytes_sent_total`` over its
``molink:generation_tokens_total``), every server's CPU seconds, and the load average.
The phases run ``--repeats`` rounds, interleaved; ratios compare median throughputs.

    python bench/pipeline_bench.py [--split 17] [--phases single,pipeline,pipeline-k1]
                                   [--repeats 2] [--quick]

Writes ``bench/results/pipeline.json``; exits 1 if a phase failed or requests errored.
Targets: pipeline >= 1.6x pipeline-k1 and pipeline >= 1.0x single (output tokens/s).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    LOOPBACK,
    ServerProcess,
    fetch_metrics,
    free_port,
    metric_total,
    metrics_delta,
    molink_serve_command,
    start_server,
    stop_server,
    wait_for_health,
    write_results,
)
from molink.loadgen import LoadConfig, fixed_workload, format_summary, run_load  # noqa: E402

logger = logging.getLogger("pipeline_bench")

NUM_LAYERS = 30  # SmolLM2-135M
TARGET_VS_ONE_MICRO_BATCH = 1.6
TARGET_VS_SINGLE = 1.0
WARMUP_REQUESTS = 2
WARMUP_TOKENS = 8
PHASES = ("single", "pipeline", "pipeline-k3", "pipeline-k1", "pipeline-k2")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class BenchConfig:
    num_requests: int = 32
    prompt_len: int = 128
    output_len: int = 128
    split: int = 17  # the head holds [0, split), the stage [split, 30) plus the LM head
    seed: int = 0
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    kv_cache_memory_mib: int = 512
    startup_timeout_s: float = 600.0
    run_timeout_s: float = 1800.0

    def engine_flags(self) -> list[str]:
        return [
            "--dtype", "float32",
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--kv-cache-memory", f"{self.kv_cache_memory_mib}MiB",
            "--log-level", "info",
        ]  # fmt: skip


@dataclass
class Phase:
    """What one phase ran: its name, its servers' command lines, and the head's URL."""

    name: str
    commands: list[list[str]]
    servers: list[ServerProcess]

    @property
    def base_url(self) -> str:
        return self.servers[0].base_url


# -- starting the servers of a phase --------------------------------------------------------


def single_commands(config: BenchConfig) -> list[tuple[list[str], int, int]]:
    """(command, HTTP port, torch threads) of the one-process phase."""
    port = free_port()
    command = molink_serve_command(port, [*config.engine_flags(), "--num-threads", "2"])
    return [(command, port, 2)]


def pipeline_commands(
    config: BenchConfig, micro_batches: int | None
) -> list[tuple[list[str], int, int]]:
    """(command, HTTP port, torch threads) of the head and the stage."""
    head_port, stage_port = free_port(), free_port()
    head_grpc, stage_grpc = free_port(), free_port()
    common = [*config.engine_flags(), "--num-threads", "1", "--molink-enabled"]
    head = [
        *common,
        "--molink-grpc-port", str(head_grpc),
        "--molink-start-layer", "0",
        "--molink-end-layer", str(config.split),
    ]  # fmt: skip
    if micro_batches is not None:
        head += ["--molink-micro-batches", str(micro_batches)]
    stage = [
        *common,
        "--molink-grpc-port", str(stage_grpc),
        "--molink-start-layer", str(config.split),
        "--molink-end-layer", "-1",
        "--molink-initial-peer", f"{LOOPBACK}:{head_grpc}",
    ]  # fmt: skip
    return [
        (molink_serve_command(head_port, head), head_port, 1),
        (molink_serve_command(stage_port, stage), stage_port, 1),
    ]


def phase_commands(name: str, config: BenchConfig) -> list[tuple[list[str], int, int]]:
    if name == "single":
        return single_commands(config)
    pinned = {"pipeline": None, "pipeline-k3": 3, "pipeline-k2": 2, "pipeline-k1": 1}[name]
    return pipeline_commands(config, pinned)


def wait_answering(server: ServerProcess, timeout_s: float) -> None:
    """Until the server answers /health at all (a stage answers 503 once it has joined)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"server exited:\n{server.log_tail()}")
        with contextlib.suppress(httpx.HTTPError):
            httpx.get(f"{server.base_url}/health", timeout=2.0, trust_env=False)
            return
        time.sleep(0.5)
    raise TimeoutError(f"server not answering after {timeout_s:.0f}s:\n{server.log_tail()}")


@contextlib.contextmanager
def running_phase(name: str, config: BenchConfig) -> Iterator[Phase]:
    """Start the phase's servers one after another (one loads weights at a time), wait
    until the head is ready, and stop them all when the block ends."""
    phase = Phase(name, [], [])
    try:
        for command, port, threads in phase_commands(name, config):
            env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
            phase.commands.append(command)
            phase.servers.append(start_server(command, port, env))
            wait_answering(phase.servers[-1], config.startup_timeout_s)
        wait_for_health(phase.servers[0], config.startup_timeout_s)
        yield phase
    finally:
        for server in reversed(phase.servers):
            status = stop_server(server)
            logger.info("server stopped (status %s); log at %s", status, server.log_path)


# -- measuring -------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far (Linux), None if unknown."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS


def machine_busy_seconds() -> float | None:
    """CPU seconds every process on the machine has spent busy so far (Linux /proc/stat)."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / _CLOCK_TICKS


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def hop_bytes(delta: dict[str, float]) -> dict[str, float]:
    prefix = "molink:pipeline_bytes_sent_total{"
    return {key[len(prefix) : -1]: value for key, value in delta.items() if key.startswith(prefix)}


def gauges(metrics: dict[str, float], name: str) -> dict[str, float]:
    prefix = name + "{"
    return {key[len(prefix) : -1]: v for key, v in metrics.items() if key.startswith(prefix)}


def micro_batches_used(head: ServerProcess) -> list[str]:
    """The head's log lines that set or change the micro-batch count, in order."""
    try:
        text = head.log_path.read_text(errors="replace")
    except OSError:
        return []
    marks = ("micro-batches in flight", "pipeline ready")
    return [line.split(": ", 1)[-1] for line in text.splitlines() if any(m in line for m in marks)]


async def warm_up(base_url: str, config: BenchConfig) -> None:
    specs = fixed_workload(WARMUP_REQUESTS, config.prompt_len, WARMUP_TOKENS, config.seed - 1)
    run = await run_load(specs, LoadConfig(base_url, run_timeout_s=config.run_timeout_s))
    if run.summary.num_errors:
        raise RuntimeError(f"warm-up requests failed: {run.summary.error_samples}")


async def measure(phase: Phase, config: BenchConfig) -> dict[str, Any]:
    await warm_up(phase.base_url, config)
    specs = fixed_workload(config.num_requests, config.prompt_len, config.output_len, config.seed)
    load = LoadConfig(
        phase.base_url,
        max_concurrency=config.num_requests,
        seed=config.seed,
        run_timeout_s=config.run_timeout_s,
    )
    before = fetch_metrics(phase.base_url)
    cpu_before = [cpu_seconds(s.process.pid) for s in phase.servers]
    busy_before, own_before, load_before = (
        machine_busy_seconds(),
        own_cpu_seconds(),
        os.getloadavg(),
    )
    run = await run_load(specs, load)
    busy_after, own_after, load_after = machine_busy_seconds(), own_cpu_seconds(), os.getloadavg()
    cpu_after = [cpu_seconds(s.process.pid) for s in phase.servers]
    after = fetch_metrics(phase.base_url)
    logger.info("%s:\n%s", phase.name, format_summary(run.summary))
    result = phase_result(phase, run.summary.to_dict(), before, after, cpu_before, cpu_after)
    servers = sum(c for c in result["cpu_seconds_per_server"] if c is not None)
    busy = None if busy_before is None or busy_after is None else busy_after - busy_before
    return result | {
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
        "load_generator_cpu_seconds": own_after - own_before,
        # CPU that processes other than this benchmark's used meanwhile: noise in the numbers.
        "other_processes_cpu_seconds": None
        if busy is None
        else busy - servers - (own_after - own_before),
    }


def phase_result(
    phase: Phase,
    summary: dict[str, Any],
    before: dict[str, float],
    after: dict[str, float],
    cpu_before: list[float | None],
    cpu_after: list[float | None],
) -> dict[str, Any]:
    delta = metrics_delta(before, after)
    generated = metric_total(delta, "molink:generation_tokens_total")
    hops = hop_bytes(delta)
    cpu = [
        None if a is None or b is None else a - b
        for a, b in zip(cpu_after, cpu_before, strict=True)
    ]
    return {
        "phase": phase.name,
        "commands": [" ".join(c) for c in phase.commands],
        "summary": summary,
        "generated_tokens": generated,
        "pipeline_steps": metric_total(delta, "molink:pipeline_steps_total"),
        "bytes_per_generated_token": sum(hops.values()) / generated if hops and generated else None,
        "bytes_per_hop": hops,
        "cpu_seconds_per_server": cpu,
        "stage_compute_s_per_step": gauges(after, "molink:stage_compute_seconds_per_step"),
        "stage_compute_s_per_token": gauges(after, "molink:stage_compute_seconds_per_token"),
        "micro_batch_log": micro_batches_used(phase.servers[0]),
    }


def run_phase(name: str, config: BenchConfig) -> dict[str, Any]:
    with running_phase(name, config) as phase:
        return asyncio.run(measure(phase, config))


# -- the whole run ---------------------------------------------------------------------------


def throughput(results: dict[str, dict], name: str) -> float | None:
    """The median over the rounds of a phase (its only run with one round)."""
    phase = results.get(name)
    return phase["output_throughput_median"] if phase else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def verdict(results: dict[str, dict]) -> dict[str, Any]:
    pipeline = throughput(results, "pipeline")
    vs_k1 = ratio(pipeline, throughput(results, "pipeline-k1"))
    vs_single = ratio(pipeline, throughput(results, "single"))
    return {
        "pipeline_vs_k1": vs_k1,
        "pipeline_vs_single": vs_single,
        "pipeline_k3_vs_k1": ratio(throughput(results, "pipeline-k3"), throughput(results, "pipeline-k1")),
        "pipeline_k3_vs_single": ratio(throughput(results, "pipeline-k3"), throughput(results, "single")),
        "target_vs_k1": TARGET_VS_ONE_MICRO_BATCH,
        "target_vs_single": TARGET_VS_SINGLE,
        "meets_vs_k1": None if vs_k1 is None else vs_k1 >= TARGET_VS_ONE_MICRO_BATCH,
        "meets_vs_single": None if vs_single is None else vs_single >= TARGET_VS_SINGLE,
    }  # fmt: skip


def run_benchmark(config: BenchConfig, phases: list[str], repeats: int = 1) -> dict[str, Any]:
    """Every phase ``repeats`` times, the rounds interleaved (a, b, c, a, b, c) so that a
    slow spell of a shared host lands on all phases alike; each phase keeps its last
    round's details and the throughput of every round."""
    results: dict[str, dict] = {}
    rounds: dict[str, list[float]] = {name: [] for name in phases}
    errors: list[str] = []
    for round_index in range(repeats):
        for name in phases:
            try:
                result = run_phase(name, config)
            except Exception as exc:  # a failed phase is reported; the others still run
                logger.exception("phase %s failed", name)
                errors.append(f"{name} (round {round_index + 1}): {type(exc).__name__}: {exc}")
                continue
            rounds[name].append(result["summary"]["output_throughput"])
            results[name] = result | {
                "output_throughput_rounds": list(rounds[name]),
                "output_throughput_median": statistics.median(rounds[name]),
            }
    return {
        "config": asdict(config),
        "phases": results,
        "verdict": verdict(results),
        "errors": errors,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-requests", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--split", type=int, default=BenchConfig.split, help="head's end layer")
    parser.add_argument(
        "--phases", default=",".join(PHASES[:4]), help=f"any of {', '.join(PHASES)}"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=2, help="interleaved rounds of all phases")
    parser.add_argument("--quick", action="store_true", help="smoke test: 4 requests, 8 tokens")
    parser.add_argument("--name", default="pipeline", help="results file bench/results/NAME.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    phases = [name.strip() for name in args.phases.split(",") if name.strip()]
    unknown = sorted(set(phases) - set(PHASES))
    if unknown:
        build_parser().error(f"unknown phases {unknown}; known: {', '.join(PHASES)}")
    num_requests, output_len = (4, 8) if args.quick else (args.num_requests, args.output_len)
    config = BenchConfig(num_requests, args.prompt_len, output_len, args.split, args.seed)
    payload = run_benchmark(config, phases, max(1, args.repeats))
    payload["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    write_results(args.name, payload)
    for name, result in payload["phases"].items():
        summary = result["summary"]
        logger.info(
            "%-12s %7.1f tok/s (median)  TTFT p50 %7.0f ms  TPOT p50 %6.1f ms  %s B/token",
            name,
            result["output_throughput_median"],
            summary["ttft_p50_ms"] or 0.0,
            summary["tpot_p50_ms"] or 0.0,
            result["bytes_per_generated_token"],
        )
    logger.info("verdict: %s", payload["verdict"])
    request_errors = sum(r["summary"]["num_errors"] for r in payload["phases"].values())
    return 1 if payload["errors"] or request_errors else 0


if __name__ == "__main__":
    sys.exit(main())
