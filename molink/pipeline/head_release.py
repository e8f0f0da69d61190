"""Freeing finished sequences: each route's nodes free its sequences in band, after the
steps already sent along it, so a release never overtakes a step that still needs the KV.

A sequence released along its old route may be sent again along another that shares a
later node; the two reach that node by different streams, so the release may come
second. It names the first step not yet submitted when it left, and the node keeps a
copy that a plan of that step or a later one started.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from molink.pipeline.head_spot_checks import HeadSpotChecks
from molink.pipeline.node import StageNode
from molink.pipeline.outbound import OutboundRelease
from molink.pipeline.route_book import RouteBook
from molink.pipeline.worker import ReleaseJob
from molink.placement.route import Route
from molink.step import StepPlan
from molink.transport.validate import release_chunks


class SequenceReleases:
    def __init__(
        self,
        node: StageNode,
        routes: RouteBook,
        spot: HeadSpotChecks | None,
        next_step: Callable[[], int],
    ) -> None:
        self._node = node
        self._routes = routes
        self._spot = spot
        self._next_step = next_step  # the first step id not yet submitted

    @property
    def head_id(self) -> str:
        return self._node.node_id

    def release(self, seq_ids: list[int]) -> None:
        """In band: each route's nodes free its sequences after the steps already sent."""
        if not seq_ids:
            return
        groups = self._routes.forget(seq_ids)
        routed = {s for _, ids in groups.values() for s in ids}
        local = tuple(s for s in seq_ids if s not in routed)
        if local:  # never sent anywhere: only this node's own stage may know them
            self._node.submit(ReleaseJob(self.head_id, None, local, propagate=False))
        before = self._next_step()
        for route, ids in groups.values():
            self._node.submit(ReleaseJob(self.head_id, route, tuple(ids), True, before))
        for route, shadows in self._spot.release(seq_ids) if self._spot else []:
            hop = route.hops[1]  # the head holds no shadow: they start at the next node
            sender = self._node.links.forward_to(hop.address, hop.node_id)
            for chunk in release_chunks(shadows):
                sender.put(OutboundRelease(self.head_id, route, chunk))

    def release_elsewhere(self, plan: StepPlan, route: Route) -> StepPlan:
        """Finished sequences of other routes are released along their own routes; the
        plan carries only those of its own."""
        if not plan.finished_seq_ids:
            return plan
        groups = self._routes.forget(list(plan.finished_seq_ids))
        keep = [s for s in plan.finished_seq_ids if all(s not in ids for _, ids in groups.values())]
        before = self._next_step()
        for other, ids in groups.values():
            if other.key == route.key:
                keep += ids
            else:
                self._node.submit(ReleaseJob(self.head_id, other, tuple(ids), True, before))
        return dataclasses.replace(plan, finished_seq_ids=tuple(keep))
