"""Online estimates of one link's round trip and bandwidth, from the messages it carries.

Every message on a Forward or ReturnResults stream is acknowledged by the receiver, so
the sender knows, per message, its size ``n`` and the time from when it began to occupy
the link to its acknowledgement. On a link with round trip ``rtt`` and bottleneck rate
``B`` that time is ``rtt + n / B`` plus delays that can only add (queueing, the
receiver's processing, a busy CPU). The fit therefore uses low quantiles where it pins
the round trip and high quantiles where it pins the rate:

* round trip: a low quantile of ``elapsed - n / B`` over the recent messages whose
  serialization is small (decode steps, results), so small messages pin it;
* bandwidth: a high quantile of ``n / (elapsed - rtt)`` over the recent messages whose
  serialization time clearly exceeds the round trip's noise (prefill chunks).

A message sent while the previous one still occupied the bottleneck (which it left about
``rtt`` before its acknowledgement) waited behind it: its time from send to ack includes
that wait, so a burst of prefill chunks would look like a slow link. Such a message
followed the previous one onto the link, so the gap between the two acknowledgements is
its own time on the bottleneck: it counts for the rate only, never for the round trip.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque

from molink.engine.telemetry import LinkEstimate

RTT_QUANTILE = 0.1
BANDWIDTH_QUANTILE = 0.7
# A message is a bandwidth sample when its time on the bottleneck is at least this long,
# and at least BANDWIDTH_MIN_SHARE of the round trip, so that jitter in the round trip
# estimate moves the rate by a few percent at most.
BANDWIDTH_MIN_SERIALIZATION_S = 0.002
BANDWIDTH_MIN_SHARE = 0.5
# Smaller messages never time the rate: their time is the round trip plus whatever delayed
# them (a busy receiver, the GIL), and a few of those would pass for a slow link.
BANDWIDTH_MIN_BYTES = 16 * 1024
# The round trip is taken from messages that spend at most this share of it serializing.
RTT_MAX_SERIALIZATION_SHARE = 0.25
_MIN_SMALL_SAMPLES = 3
_FIT_ROUNDS = 3  # alternating rtt <- bandwidth <- rtt converges in two or three rounds
_REFIT_EVERY = 8
# Round-trip samples older than this (behind the newest) are dropped, so that a link whose
# delay changed is followed even when few messages find it idle; the newest few stay.
RTT_MAX_AGE_S = 60.0
_RTT_MIN_KEPT = 8


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values`` (linear interpolation); ``values`` must not be empty."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


class LinkEstimator:
    """Round trip and bandwidth of one link from (bytes, elapsed) samples; thread-safe.

    ``observe`` takes the raw send and acknowledgement times of each message of one
    in-order stream (it corrects for queueing behind the previous message); ``add`` takes
    an already-corrected sample. ``window`` recent samples pin the round trip,
    ``bandwidth_window`` recent large ones the rate, so that a long run of decode steps
    does not make the link forget its rate. Round-trip samples also expire after
    ``max_age_s`` of newer traffic. Whether a message is large is judged by its
    size against the current rate, not by its time: a small message delayed by a busy
    receiver must not pass for a slow link.
    """

    def __init__(
        self,
        hop: str = "",
        window: int = 64,
        bandwidth_window: int = 32,
        max_age_s: float = RTT_MAX_AGE_S,
    ) -> None:
        self.hop = hop
        self._max_age_s = max_age_s
        self._lock = threading.Lock()
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._sample_times: deque[float] = deque(maxlen=window)
        # (bytes, seconds, whether the seconds include the round trip)
        self._large: deque[tuple[int, float, bool]] = deque(maxlen=bandwidth_window)
        self._count = 0
        self._last_ack_at: float | None = None
        self._fit: tuple[float, float] = (math.inf, 0.0)  # (bandwidth, rtt) last solved
        self._unfitted = 0  # samples added since the last solve

    def observe(self, num_bytes: int, sent_at: float, acked_at: float) -> None:
        """One acknowledged message: handed to the transport at ``sent_at``, acknowledged
        at ``acked_at`` (monotonic seconds). Calls must follow the stream's order."""
        with self._lock:
            previous_ack = self._last_ack_at
            self._last_ack_at = acked_at if previous_ack is None else max(previous_ack, acked_at)
            if previous_ack is None or previous_ack <= sent_at:
                self._add(num_bytes, acked_at - sent_at, acked_at)
                return
            if not self._samples:
                return  # no round trip yet to tell whether it waited
            bandwidth, rtt = self._recent_fit()
            if previous_ack - rtt <= sent_at:
                self._add(num_bytes, acked_at - sent_at, acked_at)  # the link was free by then
                return
            # It waited behind the previous message and followed it onto the link as soon
            # as that one left, so the gap between their acknowledgements is its time on
            # the bottleneck. It says nothing about the round trip.
            self._count += 1
            self._unfitted += 1
            gap = acked_at - previous_ack
            if self._is_large(num_bytes, gap + rtt, bandwidth, rtt):
                self._large.append((num_bytes, gap, False))

    def add(self, num_bytes: int, elapsed_s: float, at: float | None = None) -> None:
        """A sample already counted from when the message began to occupy the link,
        acknowledged at ``at`` (monotonic seconds, default now)."""
        with self._lock:
            self._add(num_bytes, elapsed_s, time.monotonic() if at is None else at)

    def estimate(self) -> LinkEstimate:
        """The current fit; with no samples, ``rtt_s`` is 0 and the bandwidth infinite."""
        with self._lock:
            if not self._samples:
                return LinkEstimate(self.hop, math.inf, 0.0, 0)
            if self._unfitted:
                self._solve()
            bandwidth, rtt = self._fit
            return LinkEstimate(self.hop, bandwidth, rtt, self._count)

    # -- internals (hold the lock) ---------------------------------------------------------

    def _add(self, num_bytes: int, elapsed_s: float, at: float) -> None:
        if num_bytes < 0 or not math.isfinite(elapsed_s) or elapsed_s < 0:
            return
        bandwidth, rtt = self._recent_fit() if self._samples else (math.inf, elapsed_s)
        self._count += 1
        self._unfitted += 1
        self._samples.append((num_bytes, elapsed_s))
        self._sample_times.append(at)
        while len(self._samples) > _RTT_MIN_KEPT and self._sample_times[0] < at - self._max_age_s:
            self._samples.popleft()
            self._sample_times.popleft()
        if self._is_large(num_bytes, elapsed_s, bandwidth, rtt):
            self._large.append((num_bytes, elapsed_s, True))

    @staticmethod
    def _is_large(num_bytes: int, elapsed_s: float, bandwidth: float, rtt: float) -> bool:
        if num_bytes < BANDWIDTH_MIN_BYTES:
            return False
        threshold = _serialization_threshold(rtt)
        if math.isinf(bandwidth):
            return elapsed_s - rtt >= threshold  # no rate yet: time is all there is
        return num_bytes / bandwidth >= threshold

    def _recent_fit(self) -> tuple[float, float]:
        """A fit at most _REFIT_EVERY samples old: good enough to judge the next sample,
        and it keeps the cost per acknowledgement low."""
        if self._unfitted and (self._unfitted >= _REFIT_EVERY or self._count <= _REFIT_EVERY):
            self._solve()
        return self._fit

    def _solve(self) -> None:
        bandwidth = math.inf
        rtt = self._rtt(bandwidth, math.inf)
        for _ in range(_FIT_ROUNDS):
            bandwidth = self._bandwidth(rtt)
            rtt = self._rtt(bandwidth, rtt)
        self._fit = (bandwidth, rtt)
        self._unfitted = 0

    def _rtt(self, bandwidth: float, previous_rtt: float) -> float:
        residuals = [(e - n / bandwidth, n / bandwidth) for n, e in self._samples]
        limit = max(BANDWIDTH_MIN_SERIALIZATION_S, RTT_MAX_SERIALIZATION_SHARE * previous_rtt)
        small = [r for r, serialization in residuals if serialization <= limit]
        if len(small) < _MIN_SMALL_SAMPLES:  # only large messages lately: use them all
            small = [r for r, _ in residuals]
        return max(0.0, quantile(small, RTT_QUANTILE))

    def _bandwidth(self, rtt: float) -> float:
        # Half the admission threshold: a large message that went faster than the current
        # rate predicts must still count, or a rate once underestimated would stick.
        floor = _serialization_threshold(rtt) / 2
        rates = []
        for num_bytes, seconds, includes_rtt in self._large:
            serialization = seconds - rtt if includes_rtt else seconds
            if serialization >= floor and num_bytes > 0:
                rates.append(num_bytes / serialization)
        return quantile(rates, BANDWIDTH_QUANTILE) if rates else math.inf


def _serialization_threshold(rtt: float) -> float:
    return max(BANDWIDTH_MIN_SERIALIZATION_S, BANDWIDTH_MIN_SHARE * rtt)
