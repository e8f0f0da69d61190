"""A stage holds each head's sequences under a lease that the head renews.

Every message from a head renews it: steps and releases (traffic) and the head's health
checks, which come every second even while it is idle. A head that falls silent for
``lease_s`` (it died, was restarted, or dropped this node from its pipeline) loses its
lease: the stage frees every sequence of that head, so a dead head's KV does not stay
forever and a node that comes back from a freeze keeps nothing stale.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable

# Lapse records kept, the oldest forgotten first: any member can mint head ids, each of
# which can start a lease (a health check under its own id) and let it lapse, so one
# record per head ever seen would grow without bound. A record matters only while a step
# of that head received before the lapse still waits here; with at most
# max_queued_steps_per_node steps queued, this many recent lapses covers honest heads
# unless that many others lapsed in between.
MAX_LAPSE_RECORDS = 10_000


class LeaseTable:
    """Thread-safe: gRPC threads renew, the compute thread collects lapsed leases."""

    def __init__(self, lease_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if lease_s <= 0:
            raise ValueError("a lease must last > 0 seconds")
        self.lease_s = lease_s
        self._clock = clock
        self._lock = threading.Lock()
        self._renewed: dict[str, float] = {}
        # head -> when its last lease lapsed, oldest lapse first
        self._lapsed_at: OrderedDict[str, float] = OrderedDict()

    def renew(self, head_id: str) -> None:
        if not head_id:
            return
        with self._lock:
            self._renewed[head_id] = self._clock()

    def lapsed(self) -> list[str]:
        """Heads whose lease ran out since they last renewed; each is reported once (a
        head that speaks again starts a new lease)."""
        now = self._clock()
        with self._lock:
            gone = [h for h, at in self._renewed.items() if now - at > self.lease_s]
            for head_id in gone:
                del self._renewed[head_id]
                self._lapsed_at[head_id] = now
                self._lapsed_at.move_to_end(head_id)
            while len(self._lapsed_at) > MAX_LAPSE_RECORDS:
                self._lapsed_at.popitem(last=False)
        return gone

    def lapsed_since(self, head_id: str, since: float) -> bool:
        """Did ``head_id``'s lease lapse after ``since`` (a step received then is stale)?"""
        with self._lock:
            return self._lapsed_at.get(head_id, -1.0) >= since

    def holds(self, head_id: str) -> bool:
        with self._lock:
            return head_id in self._renewed
