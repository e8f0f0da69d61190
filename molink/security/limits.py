"""Per-peer bounds, so that one member cannot exhaust a node: streams held at once, and
the rate of calls such as joins.

Keys are certificate identities. Any member can mint identities (the swarm authority
derives from the shared key), so every per-identity bound comes with a node-wide one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from molink.security.peer_text import peer_text


class LimitExceededError(Exception):
    """A peer went over one of its bounds; the message says which."""


class StreamLimiter:
    """At most ``per_peer`` streams held at once by one peer, and ``per_node`` by all
    peers together, whatever identities they present (unauthenticated callers count only
    against the node)."""

    def __init__(self, per_peer: int, per_node: int) -> None:
        self.per_peer = per_peer
        self.per_node = per_node
        self._lock = threading.Lock()
        self._held: dict[str, int] = {}
        self._total = 0

    def acquire(self, peer: str | None) -> None:
        """Counts one more stream of ``peer``, or raises."""
        with self._lock:
            if peer is not None and self._held.get(peer, 0) >= self.per_peer:
                raise LimitExceededError(
                    f"node {peer} already holds {self.per_peer} streams on this node"
                )
            if self._total >= self.per_node:
                raise LimitExceededError(
                    f"this node already holds {self.per_node} streams of its peers "
                    f"(max_streams_per_node)"
                )
            self._total += 1
            if peer is not None:
                self._held[peer] = self._held.get(peer, 0) + 1

    def release(self, peer: str | None) -> None:
        with self._lock:
            self._total -= 1
            if peer is None:
                return
            self._held[peer] -= 1
            if not self._held[peer]:
                del self._held[peer]

    @contextlib.contextmanager
    def hold(self, peer: str | None) -> Iterator[None]:
        """One stream of ``peer`` while the block runs."""
        self.acquire(peer)
        try:
            yield
        finally:
            self.release(peer)

    def held(self, peer: str) -> int:
        with self._lock:
            return self._held.get(peer, 0)

    def total(self) -> int:
        with self._lock:
            return self._total


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """Token buckets: ``burst`` calls at once, then one per ``interval_s``, for each peer
    and (with ``node_burst``) for all peers together."""

    _MAX_PEERS = 10_000  # forget idle peers beyond this many, so the table stays bounded

    def __init__(
        self,
        what: str,
        burst: int,
        interval_s: float,
        node_burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.what = what
        self._burst = burst
        self._interval_s = interval_s
        self._node_burst = node_burst
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: dict[str, _Bucket] = {}
        self._node = _Bucket(float(node_burst), clock())

    def check(self, peer: str | None) -> None:
        """Takes one call's token, or raises LimitExceededError naming the bound."""
        with self._lock:
            now = self._clock()
            self._refill(self._node, now, self._node_burst)
            if self._node.tokens < 1:
                raise LimitExceededError(
                    f"too many {self.what} on this node; at most one every "
                    f"{self._interval_s:g}s after a burst of {self._node_burst}"
                )
            bucket = None
            if peer is not None:
                bucket = self._peer_bucket(peer, now)
                if bucket.tokens < 1:
                    raise LimitExceededError(
                        f"too many {self.what} from node {peer}; at most one every "
                        f"{self._interval_s:g}s after a burst of {self._burst}"
                    )
                bucket.tokens -= 1
            self._node.tokens -= 1

    def _peer_bucket(self, peer: str, now: float) -> _Bucket:
        bucket = self._peers.get(peer)
        if bucket is None:
            if len(self._peers) >= self._MAX_PEERS:
                for key in [k for k, b in self._peers.items() if self._full(b, now)]:
                    del self._peers[key]
            bucket = self._peers[peer] = _Bucket(float(self._burst), now)
        self._refill(bucket, now, self._burst)
        return bucket

    def _full(self, bucket: _Bucket, now: float) -> bool:
        return bucket.tokens + (now - bucket.updated) / self._interval_s >= self._burst

    def _refill(self, bucket: _Bucket, now: float, burst: int) -> None:
        bucket.tokens = min(float(burst), bucket.tokens + (now - bucket.updated) / self._interval_s)
        bucket.updated = now


class RefusalLog:
    """Logs refused calls without letting a peer flood the log: the first refusal of each
    peer at once, then at most one line per ``interval_s`` per peer, with how many were
    refused in between."""

    def __init__(
        self,
        logger: logging.Logger,
        interval_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._peers: OrderedDict[str, tuple[float, int]] = OrderedDict()

    def refused(self, peer: str | None, message: str) -> None:
        key = peer or "-"
        now = self._clock()
        with self._lock:
            last, suppressed = self._peers.get(key, (-math.inf, 0))
            if now - last < self._interval_s:
                self._peers[key] = (last, suppressed + 1)
                return
            self._peers[key] = (now, 0)
            self._peers.move_to_end(key)
            while len(self._peers) > RateLimiter._MAX_PEERS:
                self._peers.popitem(last=False)
        more = f" ({suppressed} more refused since the last line)" if suppressed else ""
        # A refusal quotes what the peer sent (ids, routes): bounded and printable.
        self._logger.warning("%s%s", peer_text(message), more)
