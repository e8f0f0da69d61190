"""Two stages joined by an emulated weak link: what do micro-batching, transmission scheduling
and an 8-bit wire buy when the network, not only compute, is in the way?

SmolLM2 (the default model), head ``[0, split)`` + stage ``[split, 30)``, ``--num-threads 1``
each. Link emulators sit on both hops of the ring: E1 in front of the stage's gRPC port
(head -> stage activations) and E2 in front of the head's (stage -> head sampled tokens);
each node advertises its emulator's port, so peers dial through it. Modes, in one run:

* ``naive``: one micro-batch in flight, transmission scheduling off;
* ``vllm-like``: three micro-batches in flight, transmission scheduling off;
* ``full``: adaptive micro-batches, transmission scheduling on;
* ``full-int8``: ``full`` with an 8-bit wire on both nodes;
* ``full-loopback``: ``full`` on plain loopback, no emulator (the link's upper bound);
* on request only, ablations: ``adaptive-only`` (adaptive micro-batches, scheduling off)
  and ``k3-scheduled`` (three micro-batches, scheduling on).

Each mode starts its own servers and runs a Poisson mix of short and long token-id prompts
(``mixed_workload``, ignore_eos) at each arrival rate. Recorded per run: the load
generator's summary (throughput, TTFT/TPOT/e2e percentiles), bytes per generated token from
the head's ``molink:pipeline_bytes_sent_total`` and as measured by the emulators, CPU
seconds per server, the load average.

    python bench/weak_link_bench.py [--rate-mbit 100 --rtt-ms 30] [--modes full,naive] [--quick]

Writes ``bench/results/weak_link.json`` (``--name`` to change); exits 1 if a run failed.
Targets: full >= 3x naive throughput at saturation; full's TPOT p99 >= 40% below vllm-like's;
full >= 85% of full-loopback's throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
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
from bench.pipeline_bench import (  # noqa: E402
    cpu_seconds,
    gauges,
    hop_bytes,
    micro_batches_used,
    wait_answering,
)
from molink.loadgen import (  # noqa: E402
    LoadConfig,
    fixed_workload,
    format_summary,
    mixed_workload,
    run_load,
)
from molink.netem import LinkEmulator, LinkSpec  # noqa: E402

logger = logging.getLogger("weak_link_bench")

TARGET_FULL_VS_NAIVE = 3.0
TARGET_TPOT_P99_REDUCTION = 0.40
TARGET_FULL_VS_LOOPBACK = 0.85


@dataclass(frozen=True)
class Mode:
    name: str
    micro_batches: int  # 0: adaptive
    transmission_scheduling: str
    wire_dtype: str = "auto"
    shaped: bool = True  # False: plain loopback, no emulator


MODES = {
    mode.name: mode
    for mode in (
        Mode("naive", 1, "off"),
        Mode("vllm-like", 3, "off"),
        Mode("full", 0, "on"),
        Mode("full-int8", 0, "on", wire_dtype="int8"),
        Mode("full-loopback", 0, "on", shaped=False),
        # Ablations (not run by default): which of full's two changes moves the figures.
        Mode("adaptive-only", 0, "off"),
        Mode("k3-scheduled", 3, "on"),
    )
}
# Most telling first, so that a run cut short by its time budget still has the ratios.
DEFAULT_ORDER = ("full", "naive", "vllm-like", "full-loopback", "full-int8")


@dataclass(frozen=True)
class Rate:
    name: str
    requests_per_s: float
    num_requests: int


@dataclass(frozen=True)
class BenchConfig:
    rate_mbit: float = 100.0
    rtt_ms: float = 30.0
    split: int = 15  # the head holds [0, split), the stage [split, 30) plus the LM head
    rates: tuple[Rate, ...] = (Rate("moderate", 0.12, 8), Rate("saturating", 2.0, 16))
    prompt_lengths: tuple[int, int] = (32, 1024)
    output_lengths: tuple[int, int] = (64, 256)
    seed: int = 0
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    kv_cache_memory_mib: int = 1024
    startup_timeout_s: float = 300.0
    run_timeout_s: float = 420.0
    budget_s: float = 1500.0  # whole benchmark; later modes are skipped past it

    def engine_flags(self, mode: Mode) -> list[str]:
        return [
            "--dtype", "float32",
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--kv-cache-memory", f"{self.kv_cache_memory_mib}MiB",
            "--num-threads", "1",
            "--log-level", "info",
            "--molink-enabled",
            "--molink-micro-batches", str(mode.micro_batches),
            "--molink-transmission-scheduling", mode.transmission_scheduling,
            "--molink-wire-dtype", mode.wire_dtype,
        ]  # fmt: skip

    def link(self) -> LinkSpec:
        return LinkSpec.from_rtt(self.rate_mbit, self.rtt_ms)


@dataclass
class Deployment:
    """One mode's servers (head first) and the emulators in front of their gRPC ports."""

    mode: Mode
    commands: list[list[str]] = field(default_factory=list)
    servers: list[ServerProcess] = field(default_factory=list)
    emulators: dict[str, LinkEmulator] = field(default_factory=dict)

    @property
    def base_url(self) -> str:
        return self.servers[0].base_url


# -- starting a mode's servers and links -----------------------------------------------------


def node_commands(
    config: BenchConfig, mode: Mode, grpc: dict[str, int], advertised: dict[str, int]
) -> list[tuple[list[str], int]]:
    """(command, HTTP port) of the head and the stage. The stage joins the head on its real
    port; after that each dials the other at its advertised (emulated) port."""
    head_http, stage_http = free_port(), free_port()
    common = [*config.engine_flags(mode), "--molink-advertise-host", LOOPBACK]
    head = [
        *common,
        "--molink-grpc-port", str(grpc["head"]),
        "--molink-advertise-port", str(advertised["head"]),
        "--molink-start-layer", "0",
        "--molink-end-layer", str(config.split),
    ]  # fmt: skip
    stage = [
        *common,
        "--molink-grpc-port", str(grpc["stage"]),
        "--molink-advertise-port", str(advertised["stage"]),
        "--molink-start-layer", str(config.split),
        "--molink-end-layer", "-1",
        "--molink-initial-peer", f"{LOOPBACK}:{grpc['head']}",
    ]  # fmt: skip
    return [
        (molink_serve_command(head_http, head), head_http),
        (molink_serve_command(stage_http, stage), stage_http),
    ]


def start_emulators(config: BenchConfig, grpc: dict[str, int]) -> dict[str, LinkEmulator]:
    """E1 (``to_stage``) in front of the stage, E2 (``to_head``) in front of the head; "up" is
    the direction of the hop each one carries."""
    link = config.link()
    emulators: dict[str, LinkEmulator] = {}
    for name, target in (("to_stage", grpc["stage"]), ("to_head", grpc["head"])):
        emulators[name] = LinkEmulator(LOOPBACK, 0, LOOPBACK, target, up=link).start()
        logger.info("emulator %s: :%d -> :%d (%s)", name, emulators[name].port, target, link)
    return emulators


@contextlib.contextmanager
def deployed(mode: Mode, config: BenchConfig) -> Iterator[Deployment]:
    """Start the emulators (if shaped) and the servers one after another (one loads weights
    at a time), wait until the head is ready; stop everything when the block ends."""
    deployment = Deployment(mode)
    grpc = {"head": free_port(), "stage": free_port()}
    try:
        advertised = dict(grpc)
        if mode.shaped:
            deployment.emulators = start_emulators(config, grpc)
            advertised = {
                "head": deployment.emulators["to_head"].port,
                "stage": deployment.emulators["to_stage"].port,
            }
        for command, port in node_commands(config, mode, grpc, advertised):
            env = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
            deployment.commands.append(command)
            deployment.servers.append(start_server(command, port, env))
            wait_answering(deployment.servers[-1], config.startup_timeout_s)
        wait_for_health(deployment.servers[0], config.startup_timeout_s)
        yield deployment
    finally:
        for server in reversed(deployment.servers):
            status = stop_server(server)
            logger.info("server stopped (status %s); log at %s", status, server.log_path)
        for emulator in deployment.emulators.values():
            emulator.stop()


# -- measuring -------------------------------------------------------------------------------


def emulator_bytes(deployment: Deployment) -> dict[str, int]:
    """Bytes each emulated hop has carried so far in its forward direction (gRPC framing and
    acknowledgements included: what the link really had to move)."""
    return {name: em.stats().bytes_up for name, em in deployment.emulators.items()}


async def warm_up(base_url: str, config: BenchConfig) -> None:
    specs = fixed_workload(2, 64, 8, config.seed - 1)
    run = await run_load(specs, LoadConfig(base_url, run_timeout_s=config.run_timeout_s))
    if run.summary.num_errors:
        raise RuntimeError(f"warm-up requests failed: {run.summary.error_samples}")


async def measure_rate(deployment: Deployment, rate: Rate, config: BenchConfig) -> dict[str, Any]:
    # A seed of its own per rate: the same prompts again would hit the prefix cache and
    # flatter the later run's TTFT.
    seed = config.seed + config.rates.index(rate)
    specs = mixed_workload(rate.num_requests, seed, config.prompt_lengths, config.output_lengths)
    load = LoadConfig(
        deployment.base_url,
        rate=rate.requests_per_s,
        seed=config.seed,
        run_timeout_s=config.run_timeout_s,
    )
    before, wire_before = fetch_metrics(deployment.base_url), emulator_bytes(deployment)
    cpu_before = [cpu_seconds(s.process.pid) for s in deployment.servers]
    load_before = os.getloadavg()
    run = await run_load(specs, load)
    load_after = os.getloadavg()
    cpu_after = [cpu_seconds(s.process.pid) for s in deployment.servers]
    after, wire_after = fetch_metrics(deployment.base_url), emulator_bytes(deployment)
    logger.info("%s @ %s:\n%s", deployment.mode.name, rate.name, format_summary(run.summary))
    delta = metrics_delta(before, after)
    generated = metric_total(delta, "molink:generation_tokens_total")
    hops = hop_bytes(delta)
    wire = {name: wire_after[name] - wire_before[name] for name in wire_after}
    return {
        "rate": asdict(rate),
        "summary": run.summary.to_dict(),
        "generated_tokens": generated,
        "bytes_per_generated_token": sum(hops.values()) / generated if hops and generated else None,
        "bytes_per_hop": hops,
        "emulated_bytes_per_hop": wire,
        "emulated_bytes_per_generated_token": sum(wire.values()) / generated
        if wire and generated
        else None,
        "cpu_seconds_per_server": [
            None if a is None or b is None else a - b
            for a, b in zip(cpu_after, cpu_before, strict=True)
        ],
        "stage_compute_s_per_step": gauges(after, "molink:stage_compute_seconds_per_step"),
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
    }


async def measure(deployment: Deployment, config: BenchConfig) -> dict[str, Any]:
    await warm_up(deployment.base_url, config)
    runs = {rate.name: await measure_rate(deployment, rate, config) for rate in config.rates}
    return {
        "mode": asdict(deployment.mode),
        "commands": [" ".join(c) for c in deployment.commands],
        "runs": runs,
        "micro_batch_log": micro_batches_used(deployment.servers[0])[-20:],
    }


def run_mode(mode: Mode, config: BenchConfig) -> dict[str, Any]:
    with deployed(mode, config) as deployment:
        return asyncio.run(measure(deployment, config))


# -- the whole run ---------------------------------------------------------------------------


def figure(results: dict[str, dict], mode: str, rate: str, key: str) -> float | None:
    run = results.get(mode, {}).get("runs", {}).get(rate)
    return run["summary"].get(key) if run else None


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    return numerator / denominator if numerator and denominator else None


def verdict(results: dict[str, dict], saturating: str) -> dict[str, Any]:
    """The three targets, each judged at the saturating rate (where they are meant to bite)."""

    def throughput(mode: str) -> float | None:
        return figure(results, mode, saturating, "output_throughput")

    full_vs_naive = ratio(throughput("full"), throughput("naive"))
    full_vs_loopback = ratio(throughput("full"), throughput("full-loopback"))
    tpot_full = figure(results, "full", saturating, "tpot_p99_ms")
    tpot_vllm = figure(results, "vllm-like", saturating, "tpot_p99_ms")
    reduction = 1.0 - tpot_full / tpot_vllm if tpot_full and tpot_vllm else None
    return {
        "rate": saturating,
        "full_vs_naive_throughput": full_vs_naive,
        "full_int8_vs_naive_throughput": ratio(throughput("full-int8"), throughput("naive")),
        "vllm_like_vs_naive_throughput": ratio(throughput("vllm-like"), throughput("naive")),
        "full_tpot_p99_reduction_vs_vllm_like": reduction,
        "full_vs_loopback_throughput": full_vs_loopback,
        "targets": {
            "full_vs_naive_throughput": TARGET_FULL_VS_NAIVE,
            "full_tpot_p99_reduction_vs_vllm_like": TARGET_TPOT_P99_REDUCTION,
            "full_vs_loopback_throughput": TARGET_FULL_VS_LOOPBACK,
        },
        "meets": {
            "full_vs_naive_throughput": _meets(full_vs_naive, TARGET_FULL_VS_NAIVE),
            "full_tpot_p99_reduction_vs_vllm_like": _meets(reduction, TARGET_TPOT_P99_REDUCTION),
            "full_vs_loopback_throughput": _meets(full_vs_loopback, TARGET_FULL_VS_LOOPBACK),
        },
    }


def _meets(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def run_benchmark(config: BenchConfig, modes: list[str]) -> dict[str, Any]:
    results: dict[str, dict] = {}
    errors: list[str] = []
    skipped: list[str] = []
    started = time.monotonic()
    for name in modes:
        if time.monotonic() - started > config.budget_s:
            logger.warning("time budget of %.0fs spent; skipping %s", config.budget_s, name)
            skipped.append(name)
            continue
        try:
            results[name] = run_mode(MODES[name], config)
        except Exception as exc:  # a failed mode is reported; the others still run
            logger.exception("mode %s failed", name)
            errors.append(f"{name}: {type(exc).__name__}: {exc}")
    return {
        "config": asdict(config),
        "link": config.link().describe(),
        "modes": results,
        "verdict": verdict(results, config.rates[-1].name),
        "errors": errors,
        "skipped": skipped,
        "duration_s": time.monotonic() - started,
        "loadavg_end": list(os.getloadavg()),
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate-mbit", type=float, default=BenchConfig.rate_mbit)
    parser.add_argument("--rtt-ms", type=float, default=BenchConfig.rtt_ms)
    parser.add_argument("--split", type=int, default=BenchConfig.split, help="head's end layer")
    parser.add_argument("--modes", default=",".join(DEFAULT_ORDER), help=f"any of {list(MODES)}")
    parser.add_argument("--moderate-rate", type=float, default=0.12, help="requests/s")
    parser.add_argument("--moderate-requests", type=int, default=8, help="0: skip this rate")
    parser.add_argument("--saturating-rate", type=float, default=2.0, help="requests/s")
    parser.add_argument("--saturating-requests", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=BenchConfig.budget_s)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="smoke test: 3 short requests")
    parser.add_argument("--name", default="weak_link", help="results file bench/results/NAME.json")
    return parser


def config_from(args: argparse.Namespace) -> BenchConfig:
    if args.quick:
        return BenchConfig(
            args.rate_mbit,
            args.rtt_ms,
            args.split,
            rates=(Rate("saturating", math.inf, 3),),
            prompt_lengths=(32, 256),
            output_lengths=(8, 16),
            seed=args.seed,
            budget_s=args.budget_s,
        )
    rates = tuple(
        rate
        for rate in (
            Rate("moderate", args.moderate_rate, args.moderate_requests),
            Rate("saturating", args.saturating_rate, args.saturating_requests),
        )
        if rate.num_requests > 0  # 0 requests: leave that rate out
    )
    return BenchConfig(
        args.rate_mbit, args.rtt_ms, args.split, rates=rates, seed=args.seed, budget_s=args.budget_s
    )


def log_table(payload: dict[str, Any]) -> None:
    for mode, result in payload["modes"].items():
        for rate, run in result["runs"].items():
            s = run["summary"]
            logger.info(
                "%-13s %-10s %6.1f tok/s  TTFT p50/p99 %6.0f/%6.0f ms  TPOT p50/p99 %6.1f/%6.1f ms"
                "  e2e p99 %6.0f ms  %s B/token",
                mode,
                rate,
                s["output_throughput"],
                s["ttft_p50_ms"] or 0.0,
                s["ttft_p99_ms"] or 0.0,
                s["tpot_p50_ms"] or 0.0,
                s["tpot_p99_ms"] or 0.0,
                s["e2e_p99_ms"] or 0.0,
                run["bytes_per_generated_token"],
            )
    logger.info("verdict: %s", payload["verdict"])


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    modes = [name.strip() for name in args.modes.split(",") if name.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if unknown:
        build_parser().error(f"unknown modes {unknown}; known: {', '.join(MODES)}")
    payload = run_benchmark(config_from(args), modes)
    payload["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    write_results(args.name, payload)
    log_table(payload)
    request_errors = sum(
        run["summary"]["num_errors"]
        for r in payload["modes"].values()
        for run in r["runs"].values()
    )
    return 1 if payload["errors"] or request_errors else 0


if __name__ == "__main__":
    sys.exit(main())
