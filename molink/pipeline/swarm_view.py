"""The head's one view of the swarm: nodes, liveness, speed and links, for the router.

Nodes come from the registry (joins, and records found through discovery); liveness, round
trips, queues and free KV from the health monitor; compute times and link estimates from
the head's telemetry. The router reads a snapshot of all of it (``snapshot``); the
scheduler knows nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable

from molink.engine.telemetry import LinkEstimate, StageTiming
from molink.pipeline.identity import NodeInfo
from molink.pipeline.registry import StageRegistry
from molink.pipeline.route_book import SwarmSnapshot
from molink.placement.router import ROWS_PER_STEP, Candidate, LinkCost
from molink.transport.codec import wire_row_bytes
from molink.transport.generated import molink_pb2 as pb

# Expected rows of a step, for the transfer term of the rule (decode steps dominate).
EXPECTED_ROWS_PER_STEP = ROWS_PER_STEP


class SwarmView:
    def __init__(
        self,
        registry: StageRegistry,
        health: Callable[[], dict[str, pb.HealthResponse | str]],
        round_trips: Callable[[], dict[str, float]],
        timings: Callable[[], dict[str, StageTiming]],
        links: Callable[[], dict[str, LinkEstimate]],
    ) -> None:
        self._registry = registry
        self._health = health
        self._round_trips = round_trips
        self._timings = timings
        self._links = links

    def snapshot(self) -> SwarmSnapshot:
        view = self._registry.view()
        head_info = self._registry.head
        health = self._health()
        rtts = self._round_trips()
        timings = self._timings()
        known = self._links()
        nodes = tuple(
            _candidate(n, health.get(n.node_id), rtts.get(n.node_id, 0.0), timings, view.head_id)
            for n in view.stages
            if n.node_id != view.head_id
        )

        def lookup(a: str, b: str) -> LinkCost | None:
            estimate = known.get(f"{a}->{b}")
            if estimate is None or estimate.samples == 0:
                return None
            return LinkCost(estimate.bandwidth_bytes_per_s, estimate.rtt_s)

        return SwarmSnapshot(
            head=_candidate(head_info, None, 0.0, timings, view.head_id),
            nodes=nodes,
            num_layers=view.num_layers,
            head_address=view.head_address,
            step_bytes=wire_row_bytes(head_info.model.hidden_size, head_info.wire_dtype)
            * EXPECTED_ROWS_PER_STEP,
            links=lookup,
            block_size=head_info.block_size,
        )


def _candidate(
    node: NodeInfo,
    health: pb.HealthResponse | str | None,
    rtt_s: float,
    timings: dict[str, StageTiming],
    head_id: str,
) -> Candidate:
    timing = timings.get(node.node_id)
    queued = 0
    room: int | None = node.num_kv_blocks or None
    if isinstance(health, pb.HealthResponse):
        queued = health.queued_steps
        if health.total_kv_blocks:
            mine = sum(u.kv_blocks for u in health.heads if u.head_id == head_id)
            room = health.free_kv_blocks + mine
    return Candidate(
        node_id=node.node_id,
        address=node.address,
        start=node.layers.start,
        end=node.layers.end,
        step_s=timing.compute_s_per_step if timing else 0.0,
        per_seq_s=timing.compute_s_per_token if timing else 0.0,
        queued=queued,
        room_blocks=room,
        rtt_s=rtt_s,
        announced_step_s=node.layer_step_s * (node.layers.end - node.layers.start),
    )
