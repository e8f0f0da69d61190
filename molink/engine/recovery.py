"""Failover as data: what the head's executor tells the engine when nodes are lost, and
what the engine counts while it replays.

A node that dies, freezes (misses its deadline and a probe), or reports an error is
evicted by the head's executor, which then hands the engine a ``NodeFailure`` naming the
sequences whose KV lived there. The engine moves them back to the waiting queue with all
their tokens (prompt + generated), so that the scheduler prefills them again on another
route, chunked and paced so that the streams still decoding keep their pace (the replay
budget, molink/engine/transmission.py), and generation continues from the next token.
Sampling is keyed by each sequence's position (molink/sampling/seeding.py) and the last
stage rebuilds penalties from the full token history it is sent, so the continuation is
token for token the one a failure-free run would produce.

When no route can take the sequences, they wait up to the failover timeout for a node to
join (``UnservedTimer``); after it, they end with a 503-shaped error.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from molink.step import FailureKind

# Buckets of the time from a failure to the first token after replay, in seconds.
RECOVERY_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class NodeFailure:
    """A node was evicted; ``seq_ids`` had KV there (now freed on every surviving node)."""

    node_id: str
    kind: FailureKind
    detail: str
    seq_ids: tuple[int, ...]
    detected_at: float  # time.monotonic() when the head noticed
    # The first step not yet submitted once the node was out of the routes (None: every
    # copy named is lost). A copy of a sequence first sent in this step or a later one was
    # placed after the loss: on a route without the node, or failed by its own step's
    # result. ``seq_ids`` is worked out when the node is evicted and the engine takes the
    # report later, by when a named sequence may already run again elsewhere.
    before_step: int | None = None


class RecoverySource(Protocol):
    """Offered by an executor whose nodes can be lost (the pipeline head)."""

    def take_failures(self) -> list[NodeFailure]:
        """The failures noticed since the last call, oldest first."""

    def recovery_stats(self) -> RecoveryStats: ...


@dataclass(frozen=True)
class TokenVerdict:
    """Whether the token ``step_id`` sampled for ``seq_id``, held for a spot check
    (StepResult.held_seq_ids), stands (``keep``) or is dropped, its sequence replaying
    from its last verified token."""

    seq_id: int
    step_id: int
    keep: bool


@runtime_checkable
class VerdictSource(Protocol):
    """Offered by a head that holds checked sequences' tokens (molink.pipeline.spot_holds)."""

    def take_verdicts(self) -> list[TokenVerdict]:
        """The verdicts reached since the last call."""


class RecoveryStats:
    """Counters of failovers and replays; thread-safe (the head's threads count failovers,
    the engine thread replays and first tokens)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.failovers = 0
        self.replayed_sequences = 0
        self.replayed_tokens = 0
        self._recovery_count = 0
        self._recovery_sum = 0.0
        self._recovery_max = 0.0
        self._buckets = [0] * len(RECOVERY_BUCKETS)

    def note_failover(self) -> None:
        with self._lock:
            self.failovers += 1

    def note_replayed(self, sequences: int, tokens: int) -> None:
        with self._lock:
            self.replayed_sequences += sequences
            self.replayed_tokens += tokens

    def observe_recovery(self, seconds: float) -> None:
        """Time from a failure to the first token a replayed sequence produced after it."""
        with self._lock:
            self._recovery_count += 1
            self._recovery_sum += seconds
            self._recovery_max = max(self._recovery_max, seconds)
            for index, bound in enumerate(RECOVERY_BUCKETS):
                if seconds <= bound:
                    self._buckets[index] += 1

    @property
    def recovery_max_s(self) -> float:
        with self._lock:
            return self._recovery_max

    def metric_lines(self) -> list[str]:
        """Prometheus text lines, under the ``molink:`` prefix like the other metrics."""
        with self._lock:
            lines = [
                "# TYPE molink:failovers_total counter",
                f"molink:failovers_total {self.failovers}",
                "# TYPE molink:replayed_sequences_total counter",
                f"molink:replayed_sequences_total {self.replayed_sequences}",
                "# TYPE molink:replayed_tokens_total counter",
                f"molink:replayed_tokens_total {self.replayed_tokens}",
                "# TYPE molink:failover_recovery_seconds histogram",
            ]
            for bound, count in zip(RECOVERY_BUCKETS, self._buckets, strict=True):
                lines.append(f'molink:failover_recovery_seconds_bucket{{le="{bound}"}} {count}')
            lines += [
                f'molink:failover_recovery_seconds_bucket{{le="+Inf"}} {self._recovery_count}',
                f"molink:failover_recovery_seconds_sum {self._recovery_sum}",
                f"molink:failover_recovery_seconds_count {self._recovery_count}",
                "# TYPE molink:failover_recovery_seconds_max gauge",
                f"molink:failover_recovery_seconds_max {self._recovery_max}",
            ]
        return lines


class UnservedTimer:
    """How long requests have waited with no route for them. ``expired`` answers the
    message to fail them with once they have waited ``timeout_s``; a route that comes back
    (or no request left waiting) starts the count again."""

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if timeout_s <= 0:
            raise ValueError("the failover timeout must be > 0 seconds")
        self.timeout_s = timeout_s
        self._clock = clock
        self._since: float | None = None

    def expired(self, readiness: str | None, waiting: bool) -> str | None:
        if readiness is None or not waiting:
            self._since = None
            return None
        now = self._clock()
        if self._since is None:
            self._since = now
            return None
        if now - self._since < self.timeout_s:
            return None
        self._since = None
        return f"{readiness} (no node took them within the failover timeout of {self.timeout_s:g}s)"
