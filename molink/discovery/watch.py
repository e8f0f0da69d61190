"""The head's reading of the DHT: nodes that announce themselves join its registry, and
nodes whose records expire leave it.

A record is admitted with the same checks as a join (model, layer count, protocol,
span); a refusal is logged once per node. A node is dropped when it left (its newest
record says so) or its record, once seen, expired (it stopped renewing), the same way a
failed health check drops it. A reading that merely misses a record that still lives (a
DHT reading that failed or came back short) drops nothing: it would drop every node. A
node the head dropped for failing its health checks is admitted again only once it renews
its record: until then the record is a dead node's leftover, not a sign of life.

The watch also notes when it saw each record renewed and when it expires
(``record_times``), for the dashboard.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Protocol

from molink.discovery.dht import SwarmDirectory, SwarmRecord
from molink.pipeline.identity import NodeInfo
from molink.pipeline.registry import RecordTimes

logger = logging.getLogger(__name__)


class DiscoveringHead(Protocol):
    head_id: str

    def known_nodes(self) -> dict[str, NodeInfo]: ...

    def admit_discovered(self, info: NodeInfo) -> str | None:
        """None when admitted, else why not."""

    def drop_node(self, node_id: str, reason: str) -> None: ...


# A record whose expiry moved later by more than this was renewed (DHT peers' clocks and
# the watch's own timing blur the times a little).
RENEWAL_SLACK_S = 0.5


class DiscoveryWatch:
    def __init__(
        self,
        directory: SwarmDirectory,
        head: DiscoveringHead,
        interval_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._directory = directory
        self._head = head
        self._interval_s = interval_s
        self._clock = clock
        # When the newest record read of each node seen expires (wall time).
        self._expires_at: dict[str, float] = {}
        self._seen: set[str] = set()
        # Seen announced, then found gone from the head: only a renewal seen after that
        # brings one back (one renewed just before it was killed must not).
        self._gone: set[str] = set()
        self._refused: dict[str, str] = {}
        self._times: dict[str, RecordTimes] = {}
        self._times_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dht-watch", daemon=True)

    def start(self) -> DiscoveryWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def record_times(self) -> dict[str, RecordTimes]:
        """Every record seen at the last check (this head's and other heads' too)."""
        with self._times_lock:
            return dict(self._times)

    def check_once(self) -> None:
        records = {r.info.node_id: r for r in self._directory.records()}
        renewed = self._note_times(records)
        announced = {
            node_id: record.info
            for node_id, record in records.items()
            # Another node at layer 0 is another head: routes start at this head.
            if node_id != self._head.head_id and record.info.layers.start > 0
        }
        known = self._head.known_nodes()
        for node_id, info in announced.items():
            current = known.get(node_id)
            if current is None and node_id in self._seen:
                if node_id not in self._gone:  # a renewal seen now may predate the drop
                    self._gone.add(node_id)
                    continue
                if node_id not in renewed:
                    continue  # dropped by the head, and silent since
            self._seen.add(node_id)
            self._gone.discard(node_id)
            if current is not None and (current.address, current.layers) == (
                info.address,
                info.layers,
            ):
                continue
            reason = self._head.admit_discovered(info)
            if reason is not None and self._refused.get(node_id) != reason:
                self._refused[node_id] = reason
                logger.warning("not using node %s found in the DHT: %s", node_id, reason)
        # A refusal is logged once while its record lives; the reasons of records gone
        # are let go (a swarm's churn mints node ids, and they would stay for good).
        for node_id in [n for n in self._refused if n not in announced]:
            del self._refused[node_id]
        left = self._directory.left()
        now = self._clock()
        for node_id in list(self._seen):
            if node_id in announced:
                self._expires_at[node_id] = now + records[node_id].expires_in_s
                continue
            self._gone.discard(node_id)
            reason = _why_gone(node_id in left, self._expires_at.get(node_id, 0.0), now)
            if reason is None:
                continue  # missed by this reading only: its record still lives
            # Its record is gone for good: a record read after this is a new run's.
            self._expires_at.pop(node_id, None)
            self._seen.discard(node_id)
            if node_id in known:
                self._head.drop_node(node_id, reason)

    def _note_times(self, records: dict[str, SwarmRecord]) -> set[str]:
        """Updates ``record_times``; returns the nodes whose record is new or renewed. A
        record that says its lifetime tells its age; else it counts from when it was seen."""
        now = self._clock()
        renewed: set[str] = set()
        with self._times_lock:
            previous, self._times = self._times, {}
            for node_id, record in records.items():
                expires_at = now + record.expires_in_s
                before = previous.get(node_id)
                if before is None or expires_at > before.expires_at + RENEWAL_SLACK_S:
                    renewed.add(node_id)
                    age = record.age_s if record.age_s is not None else 0.0
                    self._times[node_id] = RecordTimes(now - age, expires_at)
                else:
                    self._times[node_id] = before
        return renewed

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check_once()
            except Exception:
                logger.warning("reading the DHT failed", exc_info=True)


def _why_gone(left: bool, expires_at: float, now: float) -> str | None:
    """Why a node missing from a reading is gone, or None when its record still lives."""
    if left:
        return "it left the swarm (its DHT record says so)"
    if now >= expires_at - RENEWAL_SLACK_S:
        return "its DHT record expired"
    return None
