"""``python -m molink.loadgen``: send a workload to a server and write the results as JSON."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from pathlib import Path

import httpx

from molink.loadgen.arrivals import ArrivalError, parse_rate
from molink.loadgen.client import ENDPOINT_PATHS
from molink.loadgen.runner import LoadConfig, RunResult, run_load
from molink.loadgen.stats import format_summary
from molink.loadgen.workload import (
    RequestSpec,
    WorkloadError,
    as_text_prompts,
    fixed_workload,
    mixed_workload,
)

logger = logging.getLogger("molink.loadgen")


def _pair(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(",")
    if not sep or not low.strip().isdigit() or not high.strip().isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not LOW,HIGH")
    return int(low), int(high)


def _rate(text: str) -> float:
    try:
        return parse_rate(text)
    except ArrivalError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m molink.loadgen",
        description="Load generator for OpenAI-compatible servers (streamed requests).",
    )
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
    parser.add_argument("--model", default=None, help="model name (default: first listed)")
    parser.add_argument("--endpoint", default="completions", choices=list(ENDPOINT_PATHS))
    parser.add_argument("--workload", default="mixed", choices=("fixed", "mixed"))
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=128, help="fixed: prompt tokens")
    parser.add_argument("--output-len", type=int, default=128, help="fixed: new tokens")
    parser.add_argument("--prompt-range", type=_pair, default=(32, 1024), help="mixed: LOW,HIGH")
    parser.add_argument("--output-range", type=_pair, default=(64, 256), help="mixed: LOW,HIGH")
    parser.add_argument("--prompt-dist", default="uniform", choices=("uniform", "log-uniform"))
    parser.add_argument("--token-id-range", type=_pair, default=(1000, 10000))
    parser.add_argument("--rate", type=_rate, default=float("inf"), help="req/s, or inf")
    parser.add_argument("--max-concurrency", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--read-timeout", type=float, default=300.0, help="s per read")
    parser.add_argument("--run-timeout", type=float, default=3600.0, help="s for the run")
    parser.add_argument("--out", type=Path, default=None, help="results JSON file")
    parser.add_argument("--no-per-request", action="store_true", help="summary only in --out")
    return parser


def workload_from_args(args: argparse.Namespace) -> list[RequestSpec]:
    if args.workload == "fixed":
        return fixed_workload(
            args.num_requests, args.prompt_len, args.output_len, args.seed, args.token_id_range
        )
    return mixed_workload(
        args.num_requests,
        args.seed,
        args.prompt_range,
        args.output_range,
        args.prompt_dist,
        args.token_id_range,
    )


def config_from_args(args: argparse.Namespace) -> LoadConfig:
    return LoadConfig(
        base_url=args.url,
        model=args.model,
        endpoint=args.endpoint,
        rate=args.rate,
        max_concurrency=args.max_concurrency,
        seed=args.seed,
        temperature=args.temperature,
        api_key=args.api_key,
        read_timeout_s=args.read_timeout,
        run_timeout_s=args.run_timeout,
    )


def write_run(run: RunResult, path: Path, workload: str, per_request: bool) -> None:
    document = {"workload": workload, **run.to_dict(per_request)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2) + "\n")
    logger.info("wrote %s", path)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        specs = workload_from_args(args)
        config = config_from_args(args)
    except (WorkloadError, ValueError) as exc:
        logger.error("invalid arguments: %s", exc)
        return 2
    if args.endpoint == "chat":
        specs = as_text_prompts(specs)
    try:
        run = asyncio.run(run_load(specs, config))
    except (httpx.HTTPError, RuntimeError) as exc:
        # Only the model lookup raises; failed requests are counted in the results.
        logger.error("cannot start the run against %s: %s", args.url, exc)
        return 2
    logger.info("%s", format_summary(run.summary))
    if args.out is not None:
        write_run(run, args.out, args.workload, not args.no_per_request)
    return 0 if run.summary.num_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
