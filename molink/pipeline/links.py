"""A node's outgoing streams, and the pipelines it has joined.

Steps carry their route, so a node keeps no next hop: it keeps one Forward stream per
peer it sends to (shared by every head whose routes pass that way) and one ReturnResults
stream per head it answers, opened on first use. Each stream measures its own link;
``outgoing`` reports those estimates. The pipeline views a node learnt by joining a head
are kept too, for status answers and for passing joins on.
"""

from __future__ import annotations

import logging
import math
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from molink.engine.telemetry import LinkEstimate
from molink.pipeline.link_estimator import LinkEstimator
from molink.pipeline.registry import PipelineView
from molink.transport.sender import StreamSender

logger = logging.getLogger(__name__)

# (address, the node id expected there) -> sender
SenderFactory = Callable[[str, str], StreamSender[Any]]

# Streams of each kind (Forward, ReturnResults) a node keeps open. Routes name the
# addresses, and any member can make itself a head whose signed routes name any number
# of them; each stream holds a channel and a thread. Beyond this many, the least
# recently used stream with nothing in flight is closed (it opens again when needed).
MAX_STREAMS_PER_KIND = 128
# Node ids each head dropped that a node remembers (for refusing stale routes). A swarm's
# churn mints new node ids for as long as it runs; beyond this many per head, the ones
# dropped longest ago are forgotten (a step naming one is far older than any step still
# in flight: it would have had to wait out thousands of membership changes).
MAX_DROPPED_PER_HEAD = 4096


@dataclass(frozen=True)
class OutgoingLink:
    """What one of this node's streams has measured of its link."""

    head_id: str  # "" for a Forward stream, which any head's steps may use
    to_node_id: str
    estimate: LinkEstimate  # hop "<this node>-><to_node_id>"


@dataclass
class _Stream:
    sender: StreamSender[Any]
    to_node_id: str
    head_id: str


class LinkTable:
    """Thread-safe table of streams by peer address, and of joined pipelines by head id.

    Senders are closed outside the lock: closing fails their pending messages, and the
    failure callbacks look streams up again.
    """

    def __init__(
        self,
        node_id: str,
        make_forward: SenderFactory,
        make_results: SenderFactory | None,
    ) -> None:
        self._node_id = node_id
        self._make_forward = make_forward
        self._make_results = make_results  # None on a head: its own results stay local
        self._lock = threading.Lock()
        # address -> stream, least recently used first
        self._forward: OrderedDict[str, _Stream] = OrderedDict()
        self._results: OrderedDict[str, _Stream] = OrderedDict()
        self._views: dict[str, PipelineView] = {}
        # Nodes each head dropped from its pipeline (until a later view has them again):
        # a step whose route names one is stale, e.g. let go by a node resumed after a freeze.
        # head id -> dropped node ids, oldest drop first (an ordered set: values unused)
        self._dropped: dict[str, OrderedDict[str, None]] = {}
        self._retired_bytes = 0  # bytes sent by senders closed since

    # -- streams -----------------------------------------------------------------------

    def forward_to(self, address: str, node_id: str) -> StreamSender[Any]:
        """The Forward stream to ``address`` (opened now if there is none)."""
        with self._lock:
            stream = self._forward.get(address)
            stale: list[StreamSender[Any]] = []
            if stream is None or stream.to_node_id != node_id:
                stale += [stream.sender] if stream else []
                sender = self._make_forward(address, node_id)
                stream = self._forward[address] = _Stream(sender, node_id, "")
                stale += _evicted(self._forward, address)
            self._forward.move_to_end(address)
        self._close(stale)
        return stream.sender

    def results_to(self, address: str, head_id: str) -> StreamSender[Any] | None:
        """The ReturnResults stream to a head (None on a head itself)."""
        if self._make_results is None or not address:
            return None
        with self._lock:
            stream = self._results.get(address)
            stale: list[StreamSender[Any]] = []
            if stream is None or stream.head_id != head_id:
                stale += [stream.sender] if stream else []
                sender = self._make_results(address, head_id)
                stream = self._results[address] = _Stream(sender, head_id, head_id)
                stale += _evicted(self._results, address)
            self._results.move_to_end(address)
        self._close(stale)
        return stream.sender

    def drop_peer(self, address: str) -> None:
        """Close the streams to a peer that is gone (its pending messages fail)."""
        with self._lock:
            stale = [s.sender for s in (self._forward.pop(address, None),) if s]
            stale += [s.sender for s in (self._results.pop(address, None),) if s]
        self._close(stale)

    def bytes_sent(self) -> int:
        """Bytes this node has streamed to any peer."""
        with self._lock:
            live = sum(s.sender.bytes_sent for s in self._all_locked())
            return self._retired_bytes + live

    def outgoing(self) -> list[OutgoingLink]:
        """Estimates of every link this node sends on."""
        with self._lock:
            streams = self._all_locked()
        return [self._outgoing(s) for s in streams]

    def estimate_to(self, node_id: str) -> LinkEstimate | None:
        """This node's measurement of its Forward link to ``node_id``, if it has one."""
        return next((out.estimate for out in self.outgoing() if out.to_node_id == node_id), None)

    def _outgoing(self, stream: _Stream) -> OutgoingLink:
        hop = f"{self._node_id}->{stream.to_node_id}"
        observer = stream.sender.observer
        if isinstance(observer, LinkEstimator):
            estimate = replace(observer.estimate(), hop=hop)
        else:
            estimate = LinkEstimate(hop, math.inf, 0.0, 0)
        return OutgoingLink(stream.head_id, stream.to_node_id, estimate)

    def _all_locked(self) -> list[_Stream]:
        return [*self._forward.values(), *self._results.values()]

    # -- joined pipelines --------------------------------------------------------------

    def get(self, head_id: str) -> PipelineView | None:
        with self._lock:
            return self._views.get(head_id)

    def any_view(self) -> PipelineView | None:
        with self._lock:
            return next(iter(self._views.values()), None)

    def views(self) -> list[PipelineView]:
        with self._lock:
            return list(self._views.values())

    def apply(self, view: PipelineView) -> bool:
        """Adopt ``view`` unless an equal or newer epoch is already known for its head."""
        with self._lock:
            known = self._views.get(view.head_id)
            if known is not None and known.epoch >= view.epoch:
                return False
            self._views[view.head_id] = view
            members = {s.node_id for s in view.stages}
            dropped = self._dropped.setdefault(view.head_id, OrderedDict())
            if known is not None:
                for node_id in [s.node_id for s in known.stages if s.node_id not in members]:
                    dropped[node_id] = None
                    dropped.move_to_end(node_id)
            for node_id in members & dropped.keys():
                del dropped[node_id]
            while len(dropped) > MAX_DROPPED_PER_HEAD:
                dropped.popitem(last=False)
        return True

    def dropped_by(self, head_id: str) -> frozenset[str]:
        """The nodes ``head_id`` has dropped from its pipeline since this node joined it."""
        with self._lock:
            return frozenset(self._dropped.get(head_id, {}))

    def forget_head(self, head_id: str) -> None:
        """Forget a head's pipeline (before joining it again: a restarted head counts its
        epochs from the start)."""
        with self._lock:
            self._views.pop(head_id, None)
            self._dropped.pop(head_id, None)

    def close(self) -> None:
        with self._lock:
            senders = [s.sender for s in self._all_locked()]
            self._forward.clear()
            self._results.clear()
            self._views.clear()
            self._dropped.clear()
        self._close(senders)

    def _close(self, senders: list[StreamSender[Any]]) -> None:
        if not senders:
            return
        with self._lock:
            self._retired_bytes += sum(s.bytes_sent for s in senders)
        for sender in senders:
            sender.close()


def _evicted(streams: OrderedDict[str, _Stream], opened: str) -> list[StreamSender[Any]]:
    """Take the least recently used streams with nothing in flight out of ``streams``
    until at most MAX_STREAMS_PER_KIND remain, never the one just ``opened`` (about to
    be used); returns their senders, to close outside the lock. Streams with messages in
    flight stay (those messages are bounded by the queues that feed them)."""
    evicted: list[StreamSender[Any]] = []
    for address in list(streams):
        if len(streams) <= MAX_STREAMS_PER_KIND:
            break
        if address != opened and streams[address].sender.pending() == 0:
            evicted.append(streams.pop(address).sender)
    return evicted
