"""The timing model of one link direction, free of I/O so it can be driven by a fake clock.

A chunk read at time ``now`` starts onto the wire at ``max(now, previous departure)`` and has
left once its bytes are serialised at the link rate; it arrives one-way-delay later. Times are
absolute (the event loop's monotonic clock), so a late wake-up never shifts later chunks and
lateness cannot accumulate into a lower rate.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from molink.netem.spec import LinkSpec


class RateClock:
    """Departure times at the bottleneck of one link direction, shared by its connections."""

    def __init__(self, spec: LinkSpec) -> None:
        self._spec = spec
        self._last_departure = -math.inf

    @property
    def last_departure(self) -> float:
        return self._last_departure

    def schedule(self, nbytes: int, now: float) -> float:
        """Reserve the wire for ``nbytes`` read at ``now``; return when the last byte leaves."""
        start = max(now, self._last_departure)
        self._last_departure = start + self._spec.serialization_s(nbytes)
        return self._last_departure

    def backlog_s(self, now: float) -> float:
        """Wire time already promised beyond ``now`` (the queue at the bottleneck)."""
        return max(0.0, self._last_departure - now)

    def ready_at(self) -> float:
        """Earliest time the queue is short enough to accept another chunk."""
        return self._last_departure - self._spec.queue_s

    def has_room(self, now: float) -> bool:
        return now >= self.ready_at()


@dataclass(frozen=True)
class _Slot:
    due: float
    data: bytes | None  # None marks the sender's end of stream


@dataclass(frozen=True)
class Delivery:
    """What became due at one instant: bytes to write, and whether the stream then ended."""

    chunks: list[bytes]
    eof: bool

    @property
    def nbytes(self) -> int:
        return sum(len(c) for c in self.chunks)


class DelayLine:
    """A FIFO of chunks in flight on one connection's direction, each with its arrival time.

    Arrival times never decrease: departures from a rate clock are monotonic and the delay is
    constant, so the head is always the next thing due.
    """

    def __init__(self, delay_s: float) -> None:
        self._delay_s = delay_s
        self._slots: deque[_Slot] = deque()
        self._buffered = 0
        self._last_due = -math.inf
        self._eof_pushed = False

    def __len__(self) -> int:
        return len(self._slots)

    @property
    def buffered_bytes(self) -> int:
        return self._buffered

    @property
    def eof_pushed(self) -> bool:
        return self._eof_pushed

    def push(self, departure: float, data: bytes) -> float:
        """Put ``data`` on the line; return its arrival time."""
        if self._eof_pushed:
            raise RuntimeError("push after end of stream")
        due = self._arrival(departure)
        self._slots.append(_Slot(due, data))
        self._buffered += len(data)
        return due

    def push_eof(self, departure: float) -> float:
        """Mark the end of stream; it arrives after every chunk pushed before it."""
        due = self._arrival(departure)
        self._slots.append(_Slot(due, None))
        self._eof_pushed = True
        return due

    def next_due(self) -> float | None:
        return self._slots[0].due if self._slots else None

    def pop_due(self, now: float) -> Delivery:
        """Take everything whose arrival time is not after ``now``."""
        chunks: list[bytes] = []
        eof = False
        while self._slots and self._slots[0].due <= now:
            slot = self._slots.popleft()
            if slot.data is None:
                eof = True
                break
            chunks.append(slot.data)
            self._buffered -= len(slot.data)
        return Delivery(chunks, eof)

    def _arrival(self, departure: float) -> float:
        # Clamp so that one line stays FIFO even if its chunks came from different clocks.
        self._last_due = max(self._last_due, departure + self._delay_s)
        return self._last_due
