"""The server's Prometheus metrics, with ``prometheus-client`` doing the exposition.

Every metric is published twice: under vLLM's name (``vllm:...``) so that dashboards and
autoscalers written for vLLM work unchanged, and under ``molink:...``. Each app has its own
registry (tests run several in one process). Other parts (e.g. the transport's per-link
bandwidth) append their own text lines through ``ServerMetrics.add_source``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from molink.engine.protocol import EngineStats
from molink.outputs import RequestOutput

logger = logging.getLogger(__name__)

# As vLLM does: no "_created" timestamp series next to every counter and histogram.
prometheus_client.disable_created_metrics()

MetricSource = Callable[[], Iterable[str]]
PREFIXES = ("vllm", "molink")
FINISH_REASONS = ("stop", "length", "abort", "error")

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
               60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip


class _Twin:
    """One metric under each prefix, observed together."""

    def __init__(self, kind: type, name: str, help_text: str, registry, labels, **kw) -> None:
        self._metrics = [
            kind(f"{prefix}:{name}", help_text, labels, registry=registry, **kw)
            for prefix in PREFIXES
        ]

    def labels(self, *values: str) -> list:
        return [m.labels(*values) for m in self._metrics]


class _EngineGauges(Collector):
    """Reads the engine's stats at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self._model_name = model_name
        self._stats = stats

    def collect(self) -> Iterator:
        try:
            stats = self._stats()
        except Exception:
            logger.exception("engine stats are unavailable")
            return
        gauges = (
            ("num_requests_running", "Requests running in the engine.", stats.num_running),
            ("num_requests_waiting", "Requests waiting to be scheduled.", stats.num_waiting),
            ("kv_cache_usage_perc", "KV-cache usage; 1 means 100 percent.", stats.kv_usage),
            ("gpu_cache_usage_perc", "KV-cache usage (vLLM's older name).", stats.kv_usage),
            ("num_free_kv_blocks", "Free KV-cache blocks.", stats.kv_free_blocks),
            ("num_total_kv_blocks", "Total KV-cache blocks.", stats.kv_total_blocks),
        )
        counters = (
            ("num_preemptions", "Sequences preempted.", stats.num_preemptions),
            ("prefix_cache_queries", "Prompt tokens looked up.", stats.prefix_cache_queries),
            ("prefix_cache_hits", "Prompt tokens found cached.", stats.prefix_cache_hits),
        )
        for prefix in PREFIXES:
            for name, help_text, value in gauges:
                family = GaugeMetricFamily(f"{prefix}:{name}", help_text, labels=["model_name"])
                family.add_metric([self._model_name], float(value))
                yield family
            for name, help_text, value in counters:
                family = CounterMetricFamily(f"{prefix}:{name}", help_text, labels=["model_name"])
                family.add_metric([self._model_name], float(value))
                yield family


class ServerMetrics:
    """Request-level counters and histograms, plus the engine's gauges at scrape time."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self._sources: list[MetricSource] = []
        labels = ["model_name"]
        reg = self.registry
        self._prompt_tokens = _Twin(Counter, "prompt_tokens", "Prompt tokens.", reg, labels)
        self._generation_tokens = _Twin(
            Counter, "generation_tokens", "Generated tokens.", reg, labels
        )
        self._success = _Twin(
            Counter,
            "request_success",
            "Finished sequences by finish reason.",
            reg,
            [*labels, "finished_reason"],
        )
        self._ttft = _Twin(
            Histogram, "time_to_first_token_seconds", "Time to first token.", reg, labels,
            buckets=TTFT_BUCKETS,
        )  # fmt: skip
        self._itl = _Twin(
            Histogram, "inter_token_latency_seconds", "Time between output tokens.", reg,
            labels, buckets=ITL_BUCKETS,
        )  # fmt: skip
        self._tpot = _Twin(
            Histogram, "time_per_output_token_seconds", "Mean time per output token after "
            "the first, per request.", reg, labels, buckets=ITL_BUCKETS,
        )  # fmt: skip
        self._e2e = _Twin(
            Histogram, "e2e_request_latency_seconds", "End-to-end request latency.", reg,
            labels, buckets=E2E_BUCKETS,
        )  # fmt: skip
        self._queue = _Twin(
            Histogram, "request_queue_time_seconds", "Time waiting before first scheduled.",
            reg, labels, buckets=E2E_BUCKETS,
        )  # fmt: skip
        self._model = model_name
        # Every series exists from the start (at zero), so dashboards find them at once.
        for twin in (self._prompt_tokens, self._generation_tokens, self._ttft, self._itl,
                     self._tpot, self._e2e, self._queue):  # fmt: skip
            twin.labels(model_name)
        reg.register(_EngineGauges(model_name, stats))
        self._reasons = {r: self._success.labels(model_name, r) for r in FINISH_REASONS}

    def add_source(self, source: MetricSource) -> None:
        """Registers a callable whose text lines are appended to every scrape."""
        self._sources.append(source)

    def observe_finished(self, output: RequestOutput) -> None:
        _inc(self._prompt_tokens.labels(self._model), len(output.prompt_token_ids))
        num_generated = [len(choice.token_ids) for choice in output.outputs]
        _inc(self._generation_tokens.labels(self._model), sum(num_generated))
        for choice in output.outputs:
            self._finished(choice.finish_reason or "abort", 1)
        self._observe_latencies(output, max(num_generated, default=0))

    def observe_aborted(self, num_sequences: int) -> None:
        """A request ended by its client (disconnect) or a shutdown before it finished."""
        self._finished("abort", num_sequences)

    def observe_tokens(self, seconds_per_token: float, count: int) -> None:
        for _ in range(count):
            _observe(self._itl.labels(self._model), seconds_per_token)

    def _finished(self, reason: str, count: int) -> None:
        if reason not in self._reasons:
            self._reasons[reason] = self._success.labels(self._model, reason)
        _inc(self._reasons[reason], count)

    def _observe_latencies(self, output: RequestOutput, num_generated: int) -> None:
        # Durations use only the engine's own timestamps so that they share one clock.
        times = output.metrics
        if times.first_scheduled_time is not None:
            _observe(
                self._queue.labels(self._model), times.first_scheduled_time - times.arrival_time
            )
        if times.first_token_time is not None:
            _observe(self._ttft.labels(self._model), times.first_token_time - times.arrival_time)
        if times.finished_time is not None:
            _observe(self._e2e.labels(self._model), times.finished_time - times.arrival_time)
            if times.first_token_time is not None and num_generated > 1:
                decode_time = max(0.0, times.finished_time - times.first_token_time)
                _observe(self._tpot.labels(self._model), decode_time / (num_generated - 1))

    def render(self) -> str:
        text = generate_latest(self.registry).decode()
        lines: list[str] = []
        for source in self._sources:
            try:
                lines += [line.rstrip("\n") for line in source()]
            except Exception:
                logger.exception("a metrics source failed; its lines are left out")
        return text + ("\n".join(lines) + "\n" if lines else "")


def _inc(children: list, amount: float) -> None:
    if amount > 0:
        for child in children:
            child.inc(amount)


def _observe(children: list, value: float) -> None:
    for child in children:
        child.observe(max(0.0, value))
