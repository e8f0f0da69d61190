"""The dashboard's charts: one point a second over the last minutes, kept in memory.

Latencies come from finished requests (the API reports each one here); the engine's gauges
(running, waiting, KV usage) and the swarm's recovery counters are read at each sample.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass

from molink.engine.protocol import EngineStats
from molink.outputs import RequestOutput

HISTORY_POINTS = 300  # five minutes at one point a second
WINDOW_S = 10.0  # latency percentiles and token rates over the last ten seconds
SAMPLE_INTERVAL_S = 1.0


@dataclass(frozen=True)
class FinishedRequest:
    at: float  # wall time it finished
    tokens: int
    ttft_s: float | None
    itl_s: float | None  # mean time between its tokens after the first


@dataclass(frozen=True)
class Point:
    t: float  # unix time
    tokens_per_s: float
    running: int
    waiting: int
    kv_usage: float
    ttft_p50: float | None
    ttft_p90: float | None
    ttft_p99: float | None
    itl_p50: float | None
    itl_p90: float | None
    itl_p99: float | None
    failovers_total: int
    replays_total: int


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in [0, 100]); None without values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def finished_request(output: RequestOutput, now: float) -> FinishedRequest:
    times = output.metrics
    tokens = max((len(choice.token_ids) for choice in output.outputs), default=0)
    ttft = itl = None
    if times.first_token_time is not None:
        ttft = max(0.0, times.first_token_time - times.arrival_time)
        if times.finished_time is not None and tokens > 1:
            itl = max(0.0, times.finished_time - times.first_token_time) / (tokens - 1)
    total = sum(len(choice.token_ids) for choice in output.outputs)
    return FinishedRequest(now, total, ttft, itl)


class MetricsHistory:
    """Thread-safe: requests finish on the event loop, samples may be taken anywhere."""

    def __init__(
        self,
        stats: Callable[[], EngineStats],
        recovery: Callable[[], tuple[int, int]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._stats = stats
        self._recovery = recovery
        self._clock = clock
        self._lock = threading.Lock()
        self._finished: deque[FinishedRequest] = deque()
        self._points: deque[Point] = deque(maxlen=HISTORY_POINTS)
        self._sampled_at: float | None = None  # the clock's time at the last sample

    def observe(self, output: RequestOutput) -> None:
        """Called by the API for every request that finished."""
        now = self._clock()
        with self._lock:
            self._forget_outside(now)  # bounded even while nothing samples
            self._finished.append(finished_request(output, now))

    def points(self, since: float = 0.0) -> list[dict]:
        with self._lock:
            return [asdict(p) for p in self._points if p.t > since]

    def sample_if_due(self) -> bool:
        """Adds a point when the last one is at least a sample interval old."""
        now = self._clock()
        with self._lock:
            last = self._sampled_at if self._points else None
            if last is not None and 0 <= now - last < SAMPLE_INTERVAL_S * 0.95:
                return False  # (a clock that stepped back makes a sample due at once)
            self._sampled_at = now
            self._forget_outside(now)
            recent = list(self._finished)
            # The pages ask for the points after the last they have: after the clock
            # stepped back, points go on a sample interval apart until it catches up.
            newest = self._points[-1].t if self._points else None
            t = now if newest is None or now > newest else newest + SAMPLE_INTERVAL_S
        stats = self._stats()
        failovers, replays = self._recovery()
        ttfts = [r.ttft_s for r in recent if r.ttft_s is not None]
        itls = [r.itl_s for r in recent if r.itl_s is not None]
        point = Point(
            t=t,
            tokens_per_s=sum(r.tokens for r in recent) / WINDOW_S,
            running=stats.num_running,
            waiting=stats.num_waiting,
            kv_usage=stats.kv_usage,
            ttft_p50=percentile(ttfts, 50),
            ttft_p90=percentile(ttfts, 90),
            ttft_p99=percentile(ttfts, 99),
            itl_p50=percentile(itls, 50),
            itl_p90=percentile(itls, 90),
            itl_p99=percentile(itls, 99),
            failovers_total=failovers,
            replays_total=replays,
        )
        with self._lock:
            self._points.append(point)
        return True

    def _forget_outside(self, now: float) -> None:
        """Drops requests that finished before the window; all of them when the clock
        stepped back (their times then say nothing). The caller holds the lock."""
        if self._finished and self._finished[-1].at > now:
            self._finished.clear()
        while self._finished and self._finished[0].at < now - WINDOW_S:
            self._finished.popleft()
