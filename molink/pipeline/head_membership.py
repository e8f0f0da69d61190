"""Which nodes serve the head's pipeline: joins (by call or found in the DHT), and
evictions of nodes found dead, frozen or untrustworthy.

An eviction fails the steps in flight through the node (typed, so their sequences are
replayed), frees every sequence whose route passed it on the surviving nodes and hands
those sequences to the engine (molink.pipeline.failover). The reason of a loss stays in
the head's readiness message until a node takes the lost layers again.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from molink.config import LayerRange
from molink.pipeline.failover import FailoverDesk
from molink.pipeline.head_flights import StepFlights
from molink.pipeline.head_spot_checks import HeadSpotChecks
from molink.pipeline.health import HealthMonitor
from molink.pipeline.identity import NodeInfo
from molink.pipeline.node import StageNode
from molink.pipeline.registry import JoinRefusedError, PipelineView, StageRegistry
from molink.pipeline.route_book import RouteBook
from molink.pipeline.swarm_view import SwarmView
from molink.pipeline.wire import node_from_proto, view_to_proto
from molink.placement.router import best_route
from molink.step import FailureKind
from molink.transport.generated import molink_pb2 as pb

logger = logging.getLogger(__name__)

# Why each lost node was lost, kept to explain missing layers until a node covers them
# again. A swarm's churn mints node ids and a replica's loss leaves nothing missing (so
# no join clears its note): beyond this many, the oldest notes go first.
MAX_LOSS_NOTES = 256


class Membership:
    """Thread-safe: joins arrive on gRPC threads, losses from the health, deadline and
    receiving threads."""

    def __init__(
        self,
        node: StageNode,
        registry: StageRegistry,
        monitor: HealthMonitor,
        flights: StepFlights,
        routes: RouteBook,
        swarm: SwarmView,
        failover: FailoverDesk,
        spot: HeadSpotChecks | None,
        on_view: Callable[[PipelineView], None] = lambda view: None,
    ) -> None:
        self._node = node
        self._registry = registry
        self._monitor = monitor
        self._flights = flights
        self._routes = routes
        self._swarm = swarm
        self._failover = failover
        self._spot = spot
        self._on_view = on_view  # the head's other per-node records follow each view
        self._lock = threading.Lock()
        self._coverage_of: tuple[int, str | None] | None = None  # (registry epoch, why not)
        self._lost: dict[str, tuple[NodeInfo, str]] = {}

    @property
    def head_id(self) -> str:
        return self._node.node_id

    # -- joins -----------------------------------------------------------------------------

    def handle_join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        node = node_from_proto(request.node)
        try:
            view = self._join(node)
        except JoinRefusedError as exc:
            logger.warning("head %s refused node %r: %s", self.head_id, node.node_id, exc.reason)
            return pb.JoinResponse(accepted=False, reason=exc.reason)
        self._monitor.forget(node.node_id, node.address)
        # Once no channel of the head's to its address is left in reconnect backoff.
        self._failover.node_back(node)
        with self._lock:  # a replacement makes the old loss notes moot
            for lost_id, (lost, _) in list(self._lost.items()):
                if lost_id == node.node_id or _overlaps(lost.layers, node.layers):
                    del self._lost[lost_id]
        logger.info(
            "head %s: node %s joined (epoch %d); %s",
            self.head_id,
            node.describe(),
            view.epoch,
            view.readiness() or "every layer is served",
        )
        self.apply_view(view, skip=node.node_id)
        return pb.JoinResponse(accepted=True, pipeline=view_to_proto(view))

    def admit_discovered(self, info: NodeInfo) -> str | None:
        """A node found in the DHT joins as if it had called Join; None when admitted."""
        try:
            view = self._join(info)
        except JoinRefusedError as exc:
            return exc.reason
        self._monitor.forget(info.node_id, info.address)
        self._failover.node_back(info)
        logger.info(
            "head %s: node %s found in the DHT (epoch %d)",
            self.head_id,
            info.describe(),
            view.epoch,
        )
        self.apply_view(view)
        return None

    def _join(self, node: NodeInfo) -> PipelineView:
        """Admit ``node``. Nodes already serving its layers that no longer answer are
        dropped now (a replacement often arrives before the health monitor notices)."""
        banned = self._spot.bans.reason(node.node_id) if self._spot else None
        if banned:
            raise JoinRefusedError(f"node {node.node_id} is banned: {banned}")
        fresh = self._registry.view().stage(node.node_id) is None
        view = self._registry.join(node)
        if fresh:
            # A node joining anew is a new process even at an address seen before: a stream
            # left to its predecessor there may sit in gRPC's reconnect backoff and fail the
            # first steps sent to the newcomer.
            self._node.links.drop_peer(node.address)
        for other in self._registry.overlapping(node):
            if other.node_id == self.head_id:
                continue
            failure = self._monitor.probe(other)
            if failure is not None:
                self.stage_down(other, f"{failure}; {node.node_id} joined for its layers")
        return self._registry.view() if view.epoch != self._registry.view().epoch else view

    # -- readiness -------------------------------------------------------------------------

    def readiness(self) -> str | None:
        view = self._registry.view()
        message = self._coverage(view)
        if message is None:
            return None
        missing = view.missing_ranges()
        with self._lock:
            notes = [
                reason
                for lost, reason in self._lost.values()
                if any(_overlaps(lost.layers, m) for m in missing)
            ]
        return "; ".join([message, *notes])

    def _coverage(self, view: PipelineView) -> str | None:
        """Why no route covers every layer (None: one does). It depends on the nodes' spans
        alone, so it is worked out once per registry epoch, not on every submitted step."""
        known = self._coverage_of
        if known is not None and known[0] == view.epoch:
            return known[1]
        message = view.readiness() or self._route_gap()
        self._coverage_of = (view.epoch, message)
        return message

    def _route_gap(self) -> str | None:
        """Every layer is served, yet no chain of spans meets end to end."""
        snap = self._swarm.snapshot()
        if best_route(snap.head, snap.nodes, snap.num_layers, snap.head_address) is not None:
            return None
        return (
            f"no chain of nodes covers layers [0, {snap.num_layers}): the spans served "
            f"({', '.join(f'[{n.start}, {n.end})' for n in snap.nodes)}) do not meet end to end"
        )

    # -- losses ----------------------------------------------------------------------------

    def evict_node(self, node_id: str, reason: str, kind: FailureKind) -> bool:
        """Drop ``node_id`` now and replay the sequences whose KV it held on other routes.
        False if it was not part of the pipeline."""
        stage = self._registry.view().stage(node_id)
        if stage is None or node_id == self.head_id:
            return False
        self.stage_down(stage, reason, kind)
        return self._registry.view().stage(node_id) is None

    def drop_banned(self) -> None:
        """Nodes the spot checks convicted leave the routes; the sequences whose KV they
        held are replayed on other routes."""
        for ban in self._spot.bans.snapshot() if self._spot else []:
            if self._registry.view().stage(ban.node_id) is not None:
                self.evict_node(ban.node_id, f"banned: {ban.reason}", FailureKind.REJECTED)

    def stage_down(
        self, stage: NodeInfo, detail: str, kind: FailureKind = FailureKind.UNREACHABLE
    ) -> None:
        """Evict ``stage``: its steps in flight fail (typed, so their sequences are
        replayed), and every sequence whose route went through it is freed on the other
        nodes and handed to the engine for replay."""
        if self._registry.remove(stage.node_id) is None:
            return
        before = self._failover.next_step()  # steps from here on see the node gone
        reason = f"stage {stage.describe()} stopped answering ({detail})"
        with self._lock:
            self._lost.pop(stage.node_id, None)  # a second loss is the newest note
            self._lost[stage.node_id] = (stage, reason)
            while len(self._lost) > MAX_LOSS_NOTES:
                del self._lost[next(iter(self._lost))]
        # Fail the steps first, so that they carry this reason rather than the one of the
        # sender that closing its stream gives.
        carried = self._flights.fail(
            f"{reason}; the step was lost", through=stage.node_id, kind=kind
        )
        self._failover.node_lost(stage, kind, detail, self._routes.evict(stage.node_id), before)
        for release in carried:  # freed elsewhere as they failed; the node may keep them
            self._failover.left_behind(stage.node_id, release.seq_ids)
        if self._spot is not None:
            self._spot.node_down(stage.node_id)  # its check routes end
        self._node.links.drop_peer(stage.address)
        self.apply_view(self._registry.view())

    def apply_view(self, view: PipelineView, skip: str | None = None) -> None:
        self._node.links.apply(view)
        self._monitor.prune(view)
        self._on_view(view)
        self._monitor.push_view(view, skip=skip)


def _overlaps(a: LayerRange, b: LayerRange) -> bool:
    return a.start < b.end and b.start < a.end
