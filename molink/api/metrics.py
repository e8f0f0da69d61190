"""Prometheus text exposition of the server's metrics, written by hand to keep dependencies few.

Names follow vLLM's with a ``molink:`` prefix. Other parts (e.g. the transport's per-link
bandwidth) add their own lines through ``ServerMetrics.add_source``.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from molink.engine.protocol import EngineStats
from molink.outputs import RequestOutput

logger = logging.getLogger(__name__)

MetricSource = Callable[[], Iterable[str]]

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
TPOT_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
FINISH_REASONS = ("stop", "length", "abort", "error")


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{int(value)}.0"


@dataclass
class Histogram:
    name: str
    help: str
    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, value: float) -> None:
        index = bisect.bisect_left(self.buckets, value)
        if index < len(self.counts):
            self.counts[index] += 1
        self.total += value
        self.count += 1

    def render(self, labels: str) -> list[str]:
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, count in zip(self.buckets, self.counts, strict=True):
            cumulative += count
            lines.append(f'{self.name}_bucket{{{labels},le="{bound}"}} {cumulative}')
        lines.append(f'{self.name}_bucket{{{labels},le="+Inf"}} {self.count}')
        lines.append(f"{self.name}_sum{{{labels}}} {self.total!r}")
        lines.append(f"{self.name}_count{{{labels}}} {self.count}")
        return lines


class ServerMetrics:
    """Request-level counters and histograms, plus the engine's gauges at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self._labels = f'model_name="{escape_label(model_name)}"'
        self._stats = stats
        self._sources: list[MetricSource] = []
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finish_reasons: dict[str, int] = dict.fromkeys(FINISH_REASONS, 0)
        self.ttft = Histogram(
            "molink:time_to_first_token_seconds", "Time to first token in seconds.", TTFT_BUCKETS
        )
        self.tpot = Histogram(
            "molink:time_per_output_token_seconds",
            "Time per output token after the first, in seconds.",
            TPOT_BUCKETS,
        )
        self.e2e = Histogram(
            "molink:e2e_request_latency_seconds",
            "End-to-end request latency in seconds.",
            E2E_BUCKETS,
        )

    def add_source(self, source: MetricSource) -> None:
        """Registers a callable whose text lines are appended to every scrape."""
        self._sources.append(source)

    def observe_finished(self, output: RequestOutput) -> None:
        self.prompt_tokens += len(output.prompt_token_ids)
        num_generated = [len(choice.token_ids) for choice in output.outputs]
        self.generation_tokens += sum(num_generated)
        for choice in output.outputs:
            reason = choice.finish_reason or "abort"
            self.finish_reasons[reason] = self.finish_reasons.get(reason, 0) + 1
        self._observe_latencies(output, max(num_generated, default=0))

    def observe_aborted(self, num_sequences: int) -> None:
        """A request ended by its client (disconnect) or a shutdown before it finished."""
        self.finish_reasons["abort"] = self.finish_reasons.get("abort", 0) + num_sequences

    def _observe_latencies(self, output: RequestOutput, num_generated: int) -> None:
        # Durations use only the engine's own timestamps so that they share one clock.
        times = output.metrics
        if times.first_token_time is not None:
            self.ttft.observe(max(0.0, times.first_token_time - times.arrival_time))
        if times.finished_time is not None:
            self.e2e.observe(max(0.0, times.finished_time - times.arrival_time))
            if times.first_token_time is not None and num_generated > 1:
                decode_time = max(0.0, times.finished_time - times.first_token_time)
                self.tpot.observe(decode_time / (num_generated - 1))

    def render(self) -> str:
        lines = self._gauge_lines() + self._counter_lines()
        for histogram in (self.ttft, self.tpot, self.e2e):
            lines += histogram.render(self._labels)
        for source in self._sources:
            try:
                lines += [line.rstrip("\n") for line in source()]
            except Exception:
                logger.exception("a metrics source failed; its lines are left out")
        return "\n".join(lines) + "\n"

    def _gauge_lines(self) -> list[str]:
        try:
            stats = self._stats()
        except Exception:
            logger.exception("engine stats are unavailable")
            return []
        gauges = (
            ("molink:num_requests_running", "Requests running in the engine.", stats.num_running),
            ("molink:num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("molink:kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", stats.kv_usage),
            ("molink:num_free_kv_blocks", "Free KV-cache blocks.", stats.kv_free_blocks),
            ("molink:num_total_kv_blocks", "Total KV-cache blocks.", stats.kv_total_blocks),
        )
        lines: list[str] = []
        for name, help_text, value in gauges:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
            lines.append(f"{name}{{{self._labels}}} {_number(value)}")
        return lines

    def _counter_lines(self) -> list[str]:
        lines: list[str] = []
        for name, help_text, value in (
            ("molink:prompt_tokens_total", "Prompt tokens processed.", self.prompt_tokens),
            ("molink:generation_tokens_total", "Tokens generated.", self.generation_tokens),
        ):
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            lines.append(f"{name}{{{self._labels}}} {_number(value)}")
        name = "molink:request_success_total"
        lines += [f"# HELP {name} Finished sequences by finish reason.", f"# TYPE {name} counter"]
        for reason, count in sorted(self.finish_reasons.items()):
            label = escape_label(reason)
            lines.append(f'{name}{{{self._labels},finished_reason="{label}"}} {_number(count)}')
        return lines
