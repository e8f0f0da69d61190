"""Serving throughput and latency through HTTP, and what HTTP costs over the bare engine.

Starts ``molink serve`` on loopback with the default model, sends a fixed workload (token-id
prompts, ``max_tokens`` new tokens each, streamed, ``ignore_eos``) at several Poisson rates
and all at once, then stops the server and runs the same all-at-once prompts through the
offline engine in this process, with the same engine settings. The HTTP overhead is
``1 - http_throughput / offline_throughput`` at that concurrency (target: below 10%).

    python bench/serving_bench.py [--rates 1,2,4,8,inf] [--num-requests 32] [--quick]

Writes ``bench/results/serving.json``; exits 1 if a phase failed or requests errored.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    fetch_metrics,
    free_port,
    metrics_delta,
    molink_serve_command,
    running_server,
    write_results,
)
from molink.loadgen import (  # noqa: E402
    LoadConfig,
    RequestSpec,
    fixed_workload,
    format_summary,
    parse_rate,
    run_load,
)

logger = logging.getLogger("serving_bench")

TARGET_HTTP_OVERHEAD = 0.10
WARMUP_REQUESTS = 2
WARMUP_TOKENS = 8


@dataclass(frozen=True)
class EngineSettings:
    """The engine's settings, the same for the server and the offline engine, so that the
    overhead compares HTTP with no HTTP and nothing else. The only place serve flags live."""

    model: str | None = None  # None: the embedded default model (SmolLM2)
    num_threads: int = 2
    dtype: str = "float32"
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    kv_cache_memory_mib: int = 512

    def serve_flags(self) -> list[str]:
        flags = [
            "--num-threads", str(self.num_threads),
            "--dtype", self.dtype,
            "--max-num-seqs", str(self.max_num_seqs),
            "--max-num-batched-tokens", str(self.max_num_batched_tokens),
            "--kv-cache-memory", f"{self.kv_cache_memory_mib}MiB",
            "--log-level", "warning",
        ]  # fmt: skip
        return flags + (["--model", self.model] if self.model else [])

    def offline_options(self) -> dict[str, Any]:
        """Keyword arguments of ``molink.engine.offline.LLM`` (its EngineOptions fields)."""
        return {
            "dtype": self.dtype,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "kv_cache_memory_bytes": self.kv_cache_memory_mib * 1024 * 1024,
        }


@dataclass(frozen=True)
class BenchConfig:
    rates: tuple[float, ...]
    num_requests: int
    concurrency: int  # of the all-at-once run, and of the offline comparison
    prompt_len: int
    output_len: int
    seed: int
    startup_timeout_s: float
    run_timeout_s: float
    skip_http: bool
    skip_offline: bool

    def workload_for(self, rate: float, index: int) -> list[RequestSpec]:
        # Each run gets its own prompts, so no run hits the prefix cache another filled.
        num = self.concurrency if math.isinf(rate) else self.num_requests
        return fixed_workload(num, self.prompt_len, self.output_len, self.seed + index)

    def to_dict(self) -> dict[str, Any]:
        values = asdict(self)
        values["rates"] = [_rate_name(rate) for rate in self.rates]
        return values


def _rate_name(rate: float) -> str | float:
    return "inf" if math.isinf(rate) else rate


async def warm_up(base_url: str, config: BenchConfig) -> None:
    """A few short requests first, so one-time costs are not billed to the first rate."""
    specs = fixed_workload(WARMUP_REQUESTS, config.prompt_len, WARMUP_TOKENS, config.seed - 1)
    run = await run_load(specs, LoadConfig(base_url, run_timeout_s=config.run_timeout_s))
    if run.summary.num_errors:
        raise RuntimeError(f"warm-up requests failed: {run.summary.error_samples}")


async def measure_rate(base_url: str, config: BenchConfig, rate: float, index: int) -> dict:
    specs = config.workload_for(rate, index)
    load = LoadConfig(
        base_url,
        rate=rate,
        max_concurrency=config.concurrency if math.isinf(rate) else None,
        seed=config.seed + index,
        run_timeout_s=config.run_timeout_s,
    )
    before = fetch_metrics(base_url)
    run = await run_load(specs, load)
    after = fetch_metrics(base_url)
    logger.info("rate %s:\n%s", _rate_name(rate), format_summary(run.summary))
    return {
        "rate": _rate_name(rate),
        "num_requests": len(specs),
        "max_concurrency": load.max_concurrency,
        "summary": run.summary.to_dict(),
        "server_metrics_delta": metrics_delta(before, after),
    }


async def http_phase(base_url: str, config: BenchConfig) -> list[dict]:
    await warm_up(base_url, config)
    return [
        await measure_rate(base_url, config, rate, index) for index, rate in enumerate(config.rates)
    ]


def offline_phase(settings: EngineSettings, config: BenchConfig) -> dict:
    """The all-at-once prompts through the engine in this process, timed the same way."""
    import torch

    from molink.engine.offline import LLM
    from molink.sampling_params import SamplingParams

    torch.set_num_threads(settings.num_threads)
    llm = LLM(model=settings.model, **settings.offline_options())
    warmup = SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0, ignore_eos=True)
    llm.generate([spec.prompt for spec in fixed_workload(1, config.prompt_len, 1)], warmup)
    specs = config.workload_for(math.inf, config.rates.index(math.inf))
    params = SamplingParams(max_tokens=config.output_len, temperature=0, ignore_eos=True)
    started = time.perf_counter()
    outputs = llm.generate([spec.prompt for spec in specs], params)
    elapsed = time.perf_counter() - started
    output_tokens = sum(len(choice.token_ids) for out in outputs for choice in out.outputs)
    result = {
        "num_requests": len(specs),
        "output_tokens": output_tokens,
        "elapsed_s": elapsed,
        "output_throughput": output_tokens / elapsed,
    }
    logger.info(
        "offline: %d tokens in %.2fs = %.1f tok/s",
        output_tokens,
        elapsed,
        result["output_throughput"],
    )
    return result


def http_overhead(http_runs: list[dict], offline: dict | None) -> float | None:
    """1 - HTTP throughput / offline throughput, at the all-at-once concurrency."""
    all_at_once = [run for run in http_runs if run["rate"] == "inf"]
    if not all_at_once or not offline or not offline["output_throughput"]:
        return None
    http_throughput = all_at_once[0]["summary"]["output_throughput"]
    return 1.0 - http_throughput / offline["output_throughput"]


def run_benchmark(settings: EngineSettings, config: BenchConfig) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "settings": asdict(settings),
        "serve_flags": settings.serve_flags(),
        "config": config.to_dict(),
        "http": [],
        "offline": None,
        "errors": [],
    }
    if not config.skip_http:
        port = free_port()
        try:
            command = molink_serve_command(port, settings.serve_flags())
            with running_server(command, port, config.startup_timeout_s) as server:
                payload["http"] = asyncio.run(http_phase(server.base_url, config))
        except Exception as exc:  # a failed phase is reported; the other phase still runs
            logger.exception("HTTP phase failed")
            payload["errors"].append(f"http: {type(exc).__name__}: {exc}")
    if not config.skip_offline and math.inf in config.rates:
        try:
            payload["offline"] = offline_phase(settings, config)
        except Exception as exc:
            logger.exception("offline phase failed")
            payload["errors"].append(f"offline: {type(exc).__name__}: {exc}")
    overhead = http_overhead(payload["http"], payload["offline"])
    payload["http_overhead"] = overhead
    payload["target_http_overhead"] = TARGET_HTTP_OVERHEAD
    payload["meets_target"] = None if overhead is None else overhead < TARGET_HTTP_OVERHEAD
    return payload


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2")
    parser.add_argument("--rates", default="1,2,4,8,inf", help="req/s list; inf = all at once")
    parser.add_argument("--num-requests", type=int, default=32, help="per Poisson rate")
    parser.add_argument("--concurrency", type=int, default=32, help="of the all-at-once run")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--startup-timeout", type=float, default=600.0)
    parser.add_argument("--run-timeout", type=float, default=1200.0, help="s per rate")
    parser.add_argument("--skip-http", action="store_true")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rates, short runs")
    parser.add_argument("--name", default="serving", help="results file bench/results/NAME.json")
    return parser


def configs_from_args(args: argparse.Namespace) -> tuple[EngineSettings, BenchConfig]:
    rates = tuple(parse_rate(text) for text in args.rates.split(","))
    num_requests, concurrency, output_len = args.num_requests, args.concurrency, args.output_len
    if args.quick:
        rates, num_requests, concurrency, output_len = (4.0, math.inf), 8, 8, 16
    settings = EngineSettings(model=args.model, num_threads=args.num_threads)
    config = BenchConfig(
        rates=rates,
        num_requests=num_requests,
        concurrency=concurrency,
        prompt_len=args.prompt_len,
        output_len=output_len,
        seed=args.seed,
        startup_timeout_s=args.startup_timeout,
        run_timeout_s=args.run_timeout,
        skip_http=args.skip_http,
        skip_offline=args.skip_offline,
    )
    return settings, config


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    settings, config = configs_from_args(args)
    payload = run_benchmark(settings, config)
    write_results(args.name, payload)
    if payload["http_overhead"] is not None:
        logger.info(
            "HTTP overhead at %d concurrent: %.1f%% (target < %.0f%%)",
            config.concurrency,
            100 * payload["http_overhead"],
            100 * TARGET_HTTP_OVERHEAD,
        )
    request_errors = sum(run["summary"]["num_errors"] for run in payload["http"])
    return 1 if payload["errors"] or request_errors else 0


if __name__ == "__main__":
    sys.exit(main())
