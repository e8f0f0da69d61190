"""How the head finds a lost node: a step that misses its deadline, a broken stream, or a
step that could not reach a node. Each is a suspicion that a probe settles; only a node
that does not answer the probe is evicted (a slow node that answers keeps its steps, which
get another deadline up to their hard one). See molink.pipeline.deadlines for the rule.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from molink.pipeline.deadlines import StepClock
from molink.pipeline.head_flights import StepFlights, StepKey, error_result
from molink.pipeline.health import HealthMonitor
from molink.pipeline.identity import NodeInfo
from molink.pipeline.registry import PipelineView, StageRegistry
from molink.pipeline.route_book import RouteBook
from molink.placement.route import Route
from molink.step import FailureKind
from molink.transport.config import TransportConfig

StageDown = Callable[[NodeInfo, str, FailureKind], None]


class LossDetection:
    """The head's deadline thread and its reactions to failed calls and broken streams."""

    def __init__(
        self,
        head_id: str,
        config: TransportConfig,
        registry: StageRegistry,
        monitor: HealthMonitor,
        flights: StepFlights,
        routes: RouteBook,
        stage_down: StageDown,
    ) -> None:
        self._head_id = head_id
        self._config = config
        self._registry = registry
        self._monitor = monitor
        self._flights = flights
        self._routes = routes
        self._stage_down = stage_down
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="head-deadlines", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        tick = min(0.2, self._config.deadline_floor_s / 4)
        while not self._stop.wait(tick):
            overdue = self._flights.overdue(time.monotonic())
            if overdue:
                self.handle_overdue(overdue)

    def handle_overdue(self, overdue: list[tuple[StepKey, StepClock, Route]]) -> None:
        """Probe the nodes of the overdue steps' routes; evict those that do not answer
        (their steps fail with them); steps whose nodes all answer get another deadline,
        up to their hard one."""
        nodes: dict[str, NodeInfo] = {}
        view = self._registry.view()
        for _, _, route in overdue:
            for hop in route.hops[1:]:
                stage = view.stage(hop.node_id)
                if stage is not None:
                    nodes[stage.node_id] = stage
        failures = self._monitor.probe_many(list(nodes.values()))
        for node_id, detail in failures.items():
            self._stage_down(
                nodes[node_id],
                f"missed a step deadline, then a probe: {detail}",
                FailureKind.DEADLINE,
            )
        now = time.monotonic()
        view = self._registry.view()
        for key, clock, route in overdue:
            gone = gone_node(view, route)
            if gone is not None:
                # Nothing more can come back along a route without one of its nodes (a
                # step that left after the eviction went out may be dropped silently by
                # the nodes after it, who know the node was dropped); its sequences are
                # replayed now rather than at the hard deadline.
                message = (
                    f"step {key[0]} (micro-batch {key[1]}) is overdue on route {route.key}, "
                    f"whose node {gone} was evicted"
                )
                self._flights.complete(error_result(key, message, FailureKind.UNREACHABLE, gone))
                continue
            if now < clock.hard_deadline:
                self._flights.extend(key, clock, now)
                continue
            message = (
                f"step {key[0]} (micro-batch {key[1]}) got no result within "
                f"{now - clock.sent_at:.1f}s on route {route.key}"
            )
            self._flights.complete(error_result(key, message, FailureKind.DEADLINE))

    def peer_broke(self, address: str, reason: str) -> None:
        """The stream to a node broke; whether it is gone, a probe decides."""
        for stage in self._registry.view().stages:
            if stage.address == address and stage.node_id != self._head_id:
                self.suspect(stage.node_id, reason)

    def suspect(self, node_id: str, detail: str) -> None:
        """A step could not reach ``node_id``: no new sequences go there while a probe (in
        the background) decides whether it is gone."""
        stage = self._registry.view().stage(node_id)
        if stage is None or node_id == self._head_id:
            return
        self._routes.avoid(node_id, self._config.health_timeout_s + 1.0)

        def probe() -> None:
            failure = self._monitor.probe(stage)
            if failure is not None:
                self._stage_down(
                    stage, f"{detail}; then a probe failed: {failure}", FailureKind.UNREACHABLE
                )

        threading.Thread(target=probe, name="head-probe", daemon=True).start()


def gone_node(view: PipelineView, route: Route) -> str | None:
    """A node of ``route`` (after the head) that is no longer in the pipeline, if any."""
    for hop in route.hops[1:]:
        if view.stage(hop.node_id) is None:
            return hop.node_id
    return None
