"""A node's view of each head it serves, and the streams that view implies.

For every head a node knows (keyed by head id), the link holds the head's latest pipeline
view, a Forward stream to the next stage on the route (none on the last stage) and a
ReturnResults stream to the head (none on the head itself, which delivers locally).
Each stream measures its own link; ``outgoing`` reports those estimates.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from molink.engine.telemetry import LinkEstimate
from molink.pipeline.link_estimator import LinkEstimator
from molink.pipeline.registry import PipelineView
from molink.transport.sender import StreamSender

logger = logging.getLogger(__name__)

# (head_id, address, peer description) -> sender
SenderFactory = Callable[[str, str, str], StreamSender[Any]]


@dataclass
class HeadLink:
    view: PipelineView
    forward: StreamSender[Any] | None = None
    results: StreamSender[Any] | None = None


@dataclass(frozen=True)
class OutgoingLink:
    """What one of this node's streams has measured of its link."""

    head_id: str  # the pipeline the stream belongs to
    to_node_id: str
    estimate: LinkEstimate  # hop "<this node>-><to_node_id>"


class LinkTable:
    """Thread-safe table of HeadLinks; senders are replaced when the route moves.

    Senders are closed outside the lock: closing fails their pending messages, and the
    failure callbacks look links up again.
    """

    def __init__(
        self,
        node_id: str,
        make_forward: SenderFactory,
        make_results: SenderFactory | None,
    ) -> None:
        self._node_id = node_id
        self._make_forward = make_forward
        self._make_results = make_results  # None on the head: results stay local
        self._lock = threading.Lock()
        self._links: dict[str, HeadLink] = {}
        self._retired_bytes = 0  # bytes sent by senders replaced since

    def bytes_sent(self) -> int:
        """Bytes this node has streamed to any peer, for every head."""
        with self._lock:
            live = sum(
                s.bytes_sent
                for link in self._links.values()
                for s in (link.forward, link.results)
                if s
            )
            return self._retired_bytes + live

    def outgoing(self) -> list[OutgoingLink]:
        """Estimates of every link this node sends on: to the next stage and to the head,
        for every head it serves."""
        with self._lock:
            links = [(link.view, link.forward, link.results) for link in self._links.values()]
        reports = []
        for view, forward, results in links:
            next_hop = view.next_hop(self._node_id)
            if forward is not None and next_hop is not None:
                reports.append(self._outgoing(view.head_id, next_hop.node_id, forward))
            if results is not None:
                reports.append(self._outgoing(view.head_id, view.head_id, results))
        return reports

    def _outgoing(self, head_id: str, to_node_id: str, sender: StreamSender[Any]) -> OutgoingLink:
        hop = f"{self._node_id}->{to_node_id}"
        observer = sender.observer
        if isinstance(observer, LinkEstimator):
            estimate = replace(observer.estimate(), hop=hop)
        else:
            estimate = LinkEstimate(hop, math.inf, 0.0, 0)
        return OutgoingLink(head_id, to_node_id, estimate)

    def get(self, head_id: str) -> HeadLink | None:
        with self._lock:
            return self._links.get(head_id)

    def any_view(self) -> PipelineView | None:
        with self._lock:
            return next((link.view for link in self._links.values()), None)

    def views(self) -> list[PipelineView]:
        with self._lock:
            return [link.view for link in self._links.values()]

    def apply(self, view: PipelineView) -> bool:
        """Adopt ``view`` unless an equal or newer epoch is already known for its head."""
        stale: list[StreamSender[Any]] = []
        with self._lock:
            link = self._links.get(view.head_id)
            if link is not None and link.view.epoch >= view.epoch:
                return False
            if link is None:
                link = self._links[view.head_id] = HeadLink(view=view)
            link.view = view
            stale += self._reconcile_forward(link)
            stale += self._reconcile_results(link)
            self._retired_bytes += sum(s.bytes_sent for s in stale)
        for sender in stale:
            sender.close()
        if view.stage(self._node_id) is None:
            logger.warning(
                "node %s is not on head %s's route (epoch %d)",
                self._node_id,
                view.head_id,
                view.epoch,
            )
        return True

    def close(self) -> None:
        with self._lock:
            senders = [
                s for link in self._links.values() for s in (link.forward, link.results) if s
            ]
            self._links.clear()
        for sender in senders:
            sender.close()

    def _reconcile_forward(self, link: HeadLink) -> list[StreamSender[Any]]:
        next_hop = link.view.next_hop(self._node_id)
        target = next_hop.address if next_hop is not None else None
        if link.forward is not None and link.forward.address == target:
            return []
        stale = [link.forward] if link.forward is not None else []
        link.forward = (
            self._make_forward(link.view.head_id, target, f"stage {next_hop.describe()}")
            if next_hop is not None
            else None
        )
        return stale

    def _reconcile_results(self, link: HeadLink) -> list[StreamSender[Any]]:
        if self._make_results is None:
            return []
        target = link.view.head_address
        if link.results is not None and link.results.address == target:
            return []
        stale = [link.results] if link.results is not None else []
        label = f"head {link.view.head_id} at {target}"
        link.results = self._make_results(link.view.head_id, target, label) if target else None
        return stale
