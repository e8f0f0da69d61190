"""Per node, only its newest record counts, and a node that left stays gone.

The DHT keeps, per node, the copy that expires last, and a reading merges the copies that
its peers, their caches and its own cache hold: an older record (a former span, a former
address, the node before it left) can come back from one of them while it lives. Each
record carries a sequence number its node raises with every announcement (nanoseconds of
its clock, so a restarted node goes on above its former records); a reader remembers the
newest it read per node, and while that one lives it is what the reader reports: an older
copy read later is not, and a leaving record hides the node.

Only one node's own records are compared, so clock skew between nodes does not matter; a
node whose clock stepped back is believed again once the newest record it had sent expires.
An announcement's lifetime is counted on the reader's clock from when it was first read,
at most the lifetime the record says: the DHT expires records by their writer's clock, so
the record of a node whose clock runs ahead would otherwise outlive the node by that much.
Its age is counted there too where the reader can: a record's age is its lifetime less
what the DHT says is left, by the writer's clock, so a node whose clock is behind reads
that much older. An announcement that replaces one the reader read is no older than the
time since that reading, and from then on it ages on the reader's clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from molink.pipeline.identity import NodeInfo


@dataclass(frozen=True)
class SwarmRecord:
    info: NodeInfo
    expires_in_s: float  # until the record expires unless renewed
    age_s: float | None  # since the node last announced it; None: its lifetime is not said


@dataclass(frozen=True)
class _Kept:
    seq: int
    leaving: bool
    record: SwarmRecord
    read_at: float  # this reader's monotonic clock
    seen_at: float  # the latest reading that returned this announcement, same clock

    def left_s(self, now: float) -> float:
        return self.record.expires_in_s - (now - self.read_at)


class NewestRecords:
    """One reader's memory of the newest record read per node, until it expires."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._kept: dict[str, _Kept] = {}

    def choose(
        self, seq: int, leaving: bool, record: SwarmRecord, ttl_s: float = 0.0
    ) -> SwarmRecord | None:
        """What to report for the node of ``record`` just read: itself when it is the
        newest, the newest kept when it is older, None when the node left or its newest
        announcement outlived its lifetime. ``ttl_s``: the lifetime the record says it was
        announced with (0: not said)."""
        node_id = record.info.node_id
        now = self._clock()
        with self._lock:
            kept = self._kept.get(node_id)
            if kept is not None and seq == kept.seq and seq > 0:
                # The same announcement again: its times run from its first reading.
                self._kept[node_id] = replace(kept, seen_at=now)
            elif kept is None or seq > kept.seq or seq == 0 or kept.left_s(now) <= 0:
                if 0 < ttl_s < record.expires_in_s:
                    # It expires later than its lifetime allows: its node's clock is ahead.
                    # Counted here instead, a node that dies without leaving still goes.
                    record = SwarmRecord(record.info, ttl_s, record.age_s)
                if kept is not None and seq > kept.seq > 0 and record.age_s is not None:
                    # Announced since the reading that still returned the one before: an
                    # age beyond that is the writer's clock being behind this one.
                    age = min(record.age_s, now - kept.seen_at)
                    record = SwarmRecord(record.info, record.expires_in_s, age)
                self._kept[node_id] = _Kept(seq, leaving, record, now, now)
                return None if leaving else record
        if kept.leaving or kept.left_s(now) <= 0:
            return None
        elapsed = now - kept.read_at
        age = kept.record.age_s + elapsed if kept.record.age_s is not None else None
        return SwarmRecord(kept.record.info, kept.left_s(now), age)

    def left(self) -> set[str]:
        """Nodes whose newest record read says they left (while it lives)."""
        now = self._clock()
        with self._lock:
            return {n for n, kept in self._kept.items() if kept.leaving and kept.left_s(now) > 0}

    def forget_expired(self, read: set[str]) -> None:
        """Drops what has expired and was not in the latest reading (``read``: its node
        ids), so that memory follows the records that live; an expired announcement the
        DHT still returns stays known as such."""
        now = self._clock()
        with self._lock:
            for node_id, kept in list(self._kept.items()):
                if node_id not in read and kept.left_s(now) <= 0:
                    del self._kept[node_id]


class SequenceClock:
    """Strictly increasing announcement numbers: this clock's nanoseconds, or one more than
    the last when the clock has not moved on (or stepped back)."""

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._last = 0

    def next(self) -> int:
        with self._lock:
            self._last = max(self._clock(), self._last + 1)
            return self._last
