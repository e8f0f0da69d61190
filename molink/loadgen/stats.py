"""Percentiles and the summary of a load run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from molink.loadgen.client import RequestResult

_MS = 1000.0
_MAX_ERROR_SAMPLES = 5


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's
    default), or None for no values: JSON has no NaN, and "no data" should read as such."""
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside [0, 100]")
    if not values:
        return None
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    lower = math.floor(position)
    upper = min(lower + 1, len(ordered) - 1)
    weight = position - lower
    return ordered[lower] * (1.0 - weight) + ordered[upper] * weight


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _ms(value: float | None) -> float | None:
    return None if value is None else value * _MS


@dataclass
class Summary:
    """A run in figures. Latencies in milliseconds; throughputs per second of the whole run
    (first send to last answer), counting only requests that succeeded."""

    num_requests: int
    num_completed: int
    num_errors: int
    duration_s: float
    request_throughput: float
    output_throughput: float
    total_output_tokens: int
    total_prompt_tokens: int
    ttft_mean_ms: float | None
    ttft_p50_ms: float | None
    ttft_p90_ms: float | None
    ttft_p99_ms: float | None
    tpot_mean_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    itl_p50_ms: float | None
    itl_p99_ms: float | None
    e2e_mean_ms: float | None
    e2e_p50_ms: float | None
    e2e_p99_ms: float | None
    # Succeeded, but with another number of output tokens than asked: with ignore_eos this
    # means the server did not honour it, and the run measured a different workload.
    num_length_mismatches: int = 0
    error_samples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(results: Sequence[RequestResult], duration_s: float) -> Summary:
    done = [r for r in results if r.succeeded]
    ttfts = [r.ttft for r in done if r.ttft is not None]
    tpots = [t for t in (r.tpot for r in done) if t is not None]
    itls = [gap for r in done for gap in r.inter_token_latencies]
    e2es = [r.e2e for r in done if r.e2e is not None]
    output_tokens = sum(r.output_tokens for r in done)
    rate_base = duration_s if duration_s > 0 else math.inf
    return Summary(
        num_requests=len(results),
        num_completed=len(done),
        num_errors=len(results) - len(done),
        duration_s=duration_s,
        request_throughput=len(done) / rate_base,
        output_throughput=output_tokens / rate_base,
        total_output_tokens=output_tokens,
        total_prompt_tokens=sum(_prompt_tokens(r) for r in done),
        ttft_mean_ms=_ms(mean(ttfts)),
        ttft_p50_ms=_ms(percentile(ttfts, 50)),
        ttft_p90_ms=_ms(percentile(ttfts, 90)),
        ttft_p99_ms=_ms(percentile(ttfts, 99)),
        tpot_mean_ms=_ms(mean(tpots)),
        tpot_p50_ms=_ms(percentile(tpots, 50)),
        tpot_p99_ms=_ms(percentile(tpots, 99)),
        itl_p50_ms=_ms(percentile(itls, 50)),
        itl_p99_ms=_ms(percentile(itls, 99)),
        e2e_mean_ms=_ms(mean(e2es)),
        e2e_p50_ms=_ms(percentile(e2es, 50)),
        e2e_p99_ms=_ms(percentile(e2es, 99)),
        num_length_mismatches=sum(1 for r in done if r.output_tokens != r.expected_output_tokens),
        error_samples=_error_samples(results),
    )


def _prompt_tokens(result: RequestResult) -> int:
    if result.prompt_tokens is not None:
        return result.prompt_tokens
    return result.prompt_length or 0


def _error_samples(results: Sequence[RequestResult]) -> list[str]:
    """A few distinct error messages, enough to tell what went wrong without the full list."""
    samples: list[str] = []
    for result in results:
        if result.error is not None and result.error not in samples:
            samples.append(result.error)
            if len(samples) == _MAX_ERROR_SAMPLES:
                break
    return samples


def format_summary(summary: Summary) -> str:
    """A few lines for a log or a terminal."""

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.1f}"

    return "\n".join(
        [
            f"requests: {summary.num_completed}/{summary.num_requests} ok, "
            f"{summary.num_errors} errors, {summary.duration_s:.2f}s",
            f"throughput: {summary.output_throughput:.1f} output tok/s, "
            f"{summary.request_throughput:.2f} req/s",
            f"TTFT ms: p50 {fmt(summary.ttft_p50_ms)} p90 {fmt(summary.ttft_p90_ms)} "
            f"p99 {fmt(summary.ttft_p99_ms)}",
            f"TPOT ms: p50 {fmt(summary.tpot_p50_ms)} p99 {fmt(summary.tpot_p99_ms)}; "
            f"ITL p99 {fmt(summary.itl_p99_ms)}",
            f"E2E ms: p50 {fmt(summary.e2e_p50_ms)} p99 {fmt(summary.e2e_p99_ms)}",
        ]
    )
