"""Running a workload against a server: arrivals, a concurrency cap, a bounded run."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import httpx

from molink.loadgen.arrivals import arrival_offsets, check_rate
from molink.loadgen.client import (
    ENDPOINT_PATHS,
    Endpoint,
    RequestResult,
    build_body,
    send_request,
)
from molink.loadgen.stats import Summary, summarize
from molink.loadgen.workload import RequestSpec

logger = logging.getLogger(__name__)

_CONNECT_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class LoadConfig:
    """How to send a workload. ``rate`` is requests/s (inf: all at once); ``max_concurrency``
    caps requests in flight (None: no cap). ``read_timeout_s`` bounds the wait for each
    next byte of a response; ``run_timeout_s`` bounds the whole run, after which requests
    still going are cancelled and counted as errors."""

    base_url: str
    model: str | None = None  # None: the first model the server lists
    endpoint: Endpoint = "completions"
    rate: float = math.inf
    max_concurrency: int | None = None
    seed: int = 0
    temperature: float = 0.0
    api_key: str | None = None
    read_timeout_s: float = 300.0
    run_timeout_s: float | None = 3600.0
    extra_body: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_rate(self.rate)
        if self.endpoint not in ENDPOINT_PATHS:
            raise ValueError(f"endpoint must be one of {list(ENDPOINT_PATHS)}")
        if self.max_concurrency is not None and self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        # A bound of 0 or below would cancel every request at once, and count each one as a
        # failure of the server; NaN would bound nothing.
        _check_bound("read_timeout_s", self.read_timeout_s)
        if self.run_timeout_s is not None:
            _check_bound("run_timeout_s", self.run_timeout_s)

    def to_dict(self) -> dict[str, Any]:
        values = {name: getattr(self, name) for name in self.__dataclass_fields__}
        values.pop("api_key")  # a secret has no place in a results file
        values["rate"] = "inf" if math.isinf(self.rate) else self.rate
        return values


def _check_bound(name: str, seconds: float) -> None:
    if not 0 < seconds < math.inf:
        raise ValueError(f"{name} must be a finite number of seconds > 0, got {seconds}")


@dataclass
class RunResult:
    config: LoadConfig
    model: str
    started_at: str  # wall-clock ISO time, for the record
    duration_s: float
    results: list[RequestResult]
    summary: Summary

    def to_dict(self, per_request: bool = True) -> dict[str, Any]:
        document: dict[str, Any] = {
            "config": {**self.config.to_dict(), "model": self.model},
            "started_at": self.started_at,
            "summary": self.summary.to_dict(),
        }
        if per_request:
            document["requests"] = [result.to_dict() for result in self.results]
        return document


def make_client(config: LoadConfig, num_requests: int) -> httpx.AsyncClient:
    # httpx caps a pool at 100 connections by default, which would silently cap concurrency.
    connections = max(1, config.max_concurrency or num_requests)
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
    return httpx.AsyncClient(
        base_url=config.base_url,
        headers=headers,
        timeout=httpx.Timeout(config.read_timeout_s, connect=_CONNECT_TIMEOUT_S, pool=None),
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections),
        trust_env=False,  # a proxy from the environment must not sit between us and the server
    )


async def fetch_model_name(client: httpx.AsyncClient) -> str:
    """The first model the server lists at /v1/models."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    try:
        answer = response.json()
    except ValueError:
        answer = None
    models = answer.get("data") if isinstance(answer, dict) else None
    first = models[0] if isinstance(models, list) and models else None
    if not isinstance(first, dict) or "id" not in first:
        shown = response.text[:200]
        raise RuntimeError(f"the server lists no model (with an id) at /v1/models: {shown}")
    return str(first["id"])


async def run_load(specs: list[RequestSpec], config: LoadConfig) -> RunResult:
    """Sends every request of ``specs`` as ``config`` says and returns what happened."""
    async with make_client(config, len(specs)) as client:
        model = config.model or await fetch_model_name(client)
        bodies = [
            build_body(spec, model, config.endpoint, config.temperature, config.extra_body)
            for spec in specs
        ]
        offsets = arrival_offsets(len(specs), config.rate, config.seed)
        results = [
            RequestResult(index, offset, spec.max_tokens, spec.prompt_length)
            for index, (spec, offset) in enumerate(zip(specs, offsets, strict=True))
        ]
        started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        duration = await _send_all(client, config, bodies, results)
    logger.info("run of %d requests took %.2fs", len(specs), duration)
    return RunResult(config, model, started_at, duration, results, summarize(results, duration))


async def _send_all(
    client: httpx.AsyncClient,
    config: LoadConfig,
    bodies: list[dict[str, Any]],
    results: list[RequestResult],
) -> float:
    """Sends every body at its offset; returns seconds from the start to the last answer."""
    path = ENDPOINT_PATHS[config.endpoint]
    limit = asyncio.Semaphore(config.max_concurrency or max(1, len(bodies)))
    run_start = time.perf_counter()

    async def one(body: dict[str, Any], result: RequestResult) -> None:
        await asyncio.sleep(max(0.0, run_start + result.scheduled_time - time.perf_counter()))
        async with limit:
            await send_request(client, path, body, result, run_start)

    tasks = [asyncio.create_task(one(b, r)) for b, r in zip(bodies, results, strict=True)]
    _, pending = await asyncio.wait(tasks, timeout=config.run_timeout_s)
    if pending:
        logger.warning("run timeout: cancelling %d requests still going", len(pending))
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for result in results:
            if result.e2e is None and result.error is None:
                result.error = f"cancelled at the run timeout ({config.run_timeout_s}s)"
    return _last_answer(results, time.perf_counter() - run_start)


def _last_answer(results: list[RequestResult], fallback: float) -> float:
    """Seconds from the start of the run to the end of its last answered request."""
    ends = [r.send_time + r.e2e for r in results if r.send_time is not None and r.e2e is not None]
    return max(ends) if ends else fallback
