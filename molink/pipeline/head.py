"""PipelineExecutor: the head's side of the pipeline (molink.engine.executor.PlanExecutor).

The head computes its own layers on its compute thread, streams the hidden states to the
next node of each step's route from a sender thread, and receives sampled tokens from the
route's last node on its ReturnResults servicer. It keeps the registry of nodes (joins
arrive on its gRPC server; replicas of a span are welcome), checks every node's health,
routes each sequence (molink.pipeline.route_book, the rule in molink.placement.router),
and guarantees that every submitted step comes back
from ``poll`` exactly once: with a result, or with an error naming what failed (a stage
stopped answering, a deadline passed, a stage rejected the step). It also reports what
it measures of every hop and stage (molink.engine.telemetry.PipelineTelemetry; see
molink.pipeline.head_telemetry).

Its parts, one file each: the steps in flight (head_flights), finding lost nodes
(head_detection), joins and evictions (head_membership), releases of finished sequences
(head_release), spot checks (head_spot_checks) and failover's frees (failover).

Starting a head::

    head = PipelineExecutor(stage0_executor, info, TransportConfig()).start()
    head.readiness()  # "layers [20, 40) are not served by any node" until stages join
    head.submit(plan); results = head.poll(0.1)
    head.close()
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import torch

from molink.engine.recovery import NodeFailure, RecoveryStats, TokenVerdict
from molink.engine.telemetry import LinkEstimate, StageTiming
from molink.errors import PipelineError
from molink.pipeline.authorization import trace_problem
from molink.pipeline.deadlines import DeadlinePolicy, StepDeadlines
from molink.pipeline.failover import FailoverDesk
from molink.pipeline.head_detection import LossDetection, gone_node
from molink.pipeline.head_flights import StepFlights, error_result
from molink.pipeline.head_membership import Membership
from molink.pipeline.head_metrics import HopTally, PipelineMetrics, swarm_metric_lines
from molink.pipeline.head_release import SequenceReleases
from molink.pipeline.head_spot_checks import HeadSpotChecks
from molink.pipeline.head_telemetry import (
    HeadTelemetry,
    fill_measured_speed,
    fill_pipeline_proto,
    metric_lines,
)
from molink.pipeline.health import HealthMonitor
from molink.pipeline.identity import NodeInfo
from molink.pipeline.mirroring import is_shadow
from molink.pipeline.node import StageNode
from molink.pipeline.registry import PipelineView, RecordTimes, StageRegistry
from molink.pipeline.route_book import RouteBook
from molink.pipeline.swarm_view import SwarmView
from molink.pipeline.wire import view_to_proto
from molink.pipeline.worker import StepJob
from molink.placement.route import Route
from molink.stage.protocol import StageExecutor
from molink.step import FailureKind, StepPlan, StepResult
from molink.transport.config import TransportConfig
from molink.transport.convert import trace_to_timings
from molink.transport.generated import molink_pb2 as pb

logger = logging.getLogger(__name__)


class PipelineExecutor:
    """Carries StepPlans through every stage. See the module docstring for its life."""

    def __init__(
        self,
        executor: StageExecutor,
        info: NodeInfo,
        config: TransportConfig | None = None,
        *,
        bind_address: str | None = None,
        input_dtype: torch.dtype | None = None,
        verify_fraction: float = 0.0,
    ) -> None:
        if info.layers.start != 0:
            raise PipelineError(f"the head must hold layer 0, not {info.layers.start}")
        self.config = config or TransportConfig()
        self._registry = StageRegistry(info, self.config.max_pipeline_nodes)
        self._node = StageNode(
            executor,
            info,
            self.config,
            bind_address=bind_address,
            input_dtype=input_dtype,
            head_role=self,
        )
        self._monitor = HealthMonitor(self.config, self._registry, on_stage_down=self._stage_down)
        self._telemetry = HeadTelemetry(
            self._node.node_id,
            self._registry.view,
            self._node.links,
            self._monitor.latest,
            route=self.route_nodes,
        )
        self.swarm = SwarmView(
            self._registry,
            self._monitor.latest,
            self._monitor.round_trips,
            self._telemetry.timings_by_node,
            self._telemetry.known_links,
        )
        self.routes = RouteBook(self.swarm.snapshot)
        self._closers: list[Callable[[], None]] = []
        self._record_times: Callable[[], dict[str, RecordTimes]] = dict
        # The one record of each step in flight here: its route, deadlines and size.
        self._flights = StepFlights(
            StepDeadlines(
                DeadlinePolicy(self.config.deadline_floor_s, self.config.deadline_factor),
                self.config.step_timeout_s,
                self._telemetry.timings_by_node,
                self._monitor.round_trips,
            ),
            on_carried_lost=lambda carried, node_id: self._failover.release_carried(
                carried, node_id
            ),
        )
        self._failover = FailoverDesk(info.node_id, self.config, self._node.submit)
        self._hops = HopTally(self._node.node_id)
        self._started = False
        # Spot checks (--molink-verify-fraction): compared within the dtypes' rounding,
        # judged apart from the users' steps; a proven ban evicts the node.
        self._spot: HeadSpotChecks | None = None
        if verify_fraction > 0:
            dtypes = (str(input_dtype or torch.float32).removeprefix("torch."), info.dtype)
            self._spot = HeadSpotChecks(
                verify_fraction,
                (*dtypes, info.wire_dtype),
                info.node_id,
                self.config,
                on_verdict=lambda: self._members.drop_banned(),
            )
            self._closers.append(self._spot.close)
        self._members = Membership(
            self._node,
            self._registry,
            self._monitor,
            self._flights,
            self.routes,
            self.swarm,
            self._failover,
            self._spot,
            on_view=self._forget_departed,
        )
        self._detection = LossDetection(
            self._node.node_id,
            self.config,
            self._registry,
            self._monitor,
            self._flights,
            self.routes,
            self._stage_down,
        )
        self._releases = SequenceReleases(
            self._node, self.routes, self._spot, self._failover.next_step
        )

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> PipelineExecutor:
        """Bind the gRPC server, start the compute, deadline and health threads."""
        self._node.start()
        self._registry.set_head_address(self._node.address)
        self._node.links.apply(self._registry.view())
        self._detection.start()
        self._monitor.start()
        self._started = True
        logger.info("head %s at %s: %s", self.head_id, self.address, self.readiness() or "ready")
        return self

    def close(self) -> None:
        for close in self._closers:
            close()
        self._detection.stop()
        self._monitor.stop()
        self._failover.close()
        self._node.stop()
        self._flights.fail("the pipeline executor was closed")

    @property
    def head_id(self) -> str:
        return self._node.node_id

    @property
    def address(self) -> str:
        return self._node.address

    @property
    def node(self) -> StageNode:
        return self._node

    def pipeline(self) -> PipelineView:
        return self._registry.view()

    # -- PlanExecutor ----------------------------------------------------------------------

    def submit(self, plan: StepPlan) -> None:
        if not self._started:
            raise PipelineError("PipelineExecutor.start() has not been called")
        key = (plan.step_id, plan.micro_batch)
        not_ready = self.readiness()
        route = self.routes.route_for_plan(plan) if not_ready is None else None
        if route is None:
            not_ready = not_ready or f"no route takes step {plan.step_id}'s sequences"
            # Its sequences wait for a route (replay), up to the failover timeout; the
            # releases it carries go along their own routes (it goes nowhere).
            self._releases.release(list(plan.finished_seq_ids))
            self._flights.refuse(
                key, f"the pipeline is not ready: {not_ready}", FailureKind.UNREACHABLE
            )
            return
        plan = self._releases.release_elsewhere(plan, route)
        self._failover.note_submitted(plan.step_id)
        self._flights.start(plan, route)
        # Checked once the step is on record: an eviction either comes before this check
        # (its node is gone now) or fails the recorded step itself. Checked before the
        # record, an eviction in between would miss the step, which would then travel to
        # the evicted node and wait for its hard deadline.
        gone = self._gone_from(route)
        if gone is not None:
            self._flights.complete(
                error_result(
                    key, f"the pipeline is not ready: {gone[0]}", FailureKind.UNREACHABLE, gone[1]
                )
            )
            return
        mirror = self._spot.plan(plan, route, self._registry.view().stages) if self._spot else None
        sent = mirror.declare(plan) if mirror is not None else plan
        job = StepJob(self.head_id, route, sent, None, trusted=True, mirror=mirror)
        try:
            self._node.submit(job)
        except PipelineError as exc:
            # The head's own stage refused it (its queue stayed full): named, so that the
            # releases it carried go on from the head (FailoverDesk.release_carried).
            self._flights.complete(error_result(key, str(exc), node_id=self.head_id))

    def _gone_from(self, route: Route) -> tuple[str, str] | None:
        """Why ``route`` cannot be used, and the node: one of its nodes was evicted since
        the route was chosen."""
        node_id = gone_node(self._registry.view(), route)
        if node_id is None:
            return None
        return f"node {node_id} of route {route.key} is gone", node_id

    def poll(self, timeout: float) -> list[StepResult]:
        return self._flights.poll(timeout)

    def release(self, seq_ids: list[int]) -> None:
        """In band: each route's nodes free its sequences after the steps already sent."""
        self._releases.release(seq_ids)

    def route_nodes(self) -> tuple[NodeInfo, ...]:
        """The nodes of the route a new sequence would take now (telemetry follows it)."""
        view = self._registry.view()
        route = self.routes.new_route()  # the answer of this step's choices, not worked again
        if route is None:
            return view.stages
        by_id = {s.node_id: s for s in view.stages}
        return tuple(by_id[h.node_id] for h in route.hops if h.node_id in by_id)

    def readiness(self) -> str | None:
        return self._members.readiness()

    # -- metrics ---------------------------------------------------------------------------

    def metrics(self) -> PipelineMetrics:
        counts = self._flights.counts()
        return PipelineMetrics(
            hops=self._hops.snapshot(),
            head_bytes_sent=self._node.links.bytes_sent(),
            steps_completed=counts.completed,
            steps_failed=counts.failed,
            sampled_tokens=counts.sampled,
        )

    # -- RecoverySource (molink.engine.recovery) and the dashboard's RecoveryCounters ------

    def take_failures(self) -> list[NodeFailure]:
        return self._failover.take()

    def recovery_stats(self) -> RecoveryStats:
        return self._failover.stats

    def take_verdicts(self) -> list[TokenVerdict]:
        """Spot checks: whether each token held for a verdict stands (a VerdictSource)."""
        return self._spot.take_verdicts() if self._spot else []

    def failovers_total(self) -> int:
        return self._failover.stats.failovers

    def replays_total(self) -> int:
        return self._failover.stats.replayed_sequences

    def evict_node(
        self, node_id: str, reason: str, kind: FailureKind = FailureKind.REJECTED
    ) -> bool:
        """Drop ``node_id`` from the pipeline now and replay the sequences whose KV it held
        on other routes (for a node found dead, frozen or untrustworthy). False if it was
        not part of the pipeline."""
        return self._members.evict_node(node_id, reason, kind)

    def _forget_departed(self, view: PipelineView) -> None:
        """What the head measured of nodes no longer in ``view`` goes with them."""
        self._telemetry.prune(view)
        self._hops.prune(view)

    def stage_health(self) -> dict[str, pb.HealthResponse | str]:
        """The latest health answer of each stage (or why there is none)."""
        return self._monitor.latest()

    def banned_nodes(self) -> dict[str, str]:
        """Nodes the spot checks banned: node id -> why (empty without spot checks)."""
        return {ban.node_id: ban.reason for ban in self._spot.bans.snapshot()} if self._spot else {}

    # -- PipelineTelemetry (molink.engine.telemetry) -------------------------------------

    def link_estimates(self) -> list[LinkEstimate]:
        """Every hop in pipeline order, the last stage -> head hop included; hops beyond
        the head's own are as fresh as the last health check."""
        return self._telemetry.link_estimates()

    def stage_timings(self) -> list[StageTiming]:
        return self._telemetry.stage_timings()

    def hidden_bytes_per_token(self) -> int:
        return self._telemetry.hidden_bytes_per_token()

    def metric_lines(self) -> list[str]:
        """Prometheus gauges of the links and stages, and traffic counters, for /metrics."""
        return [
            *metric_lines(self),
            *self.metrics().metric_lines(),
            *self._failover.stats.metric_lines(),
            *swarm_metric_lines(self._registry.view(), self.routes.route_choices_snapshot()),
            *(self._spot.metric_lines() if self._spot else []),
        ]

    # -- HeadRole (called by the node's servicer) ------------------------------------------

    def handle_join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        return self._members.handle_join(request)

    def peer_broke(self, address: str, reason: str) -> None:
        """The stream to a node broke; whether it is gone, a probe decides."""
        self._detection.peer_broke(address, reason)

    def route_of_step(self, step_id: int, micro_batch: int) -> Route | None:
        if self._spot is not None and is_shadow(step_id):
            return self._spot.route_of(step_id, micro_batch)
        flight = self._flights.get((step_id, micro_batch))
        return flight.route if flight else None

    def pipeline_proto(self) -> pb.Pipeline:
        message = view_to_proto(self._registry.view())
        fill_measured_speed(message, self.node.throughput_tokens_per_s, self.stage_health())
        message.readiness = self.readiness() or ""
        for ban in self._spot.bans.snapshot() if self._spot else []:
            message.banned.add(node_id=ban.node_id, reason=ban.reason, banned_at=ban.at)
        fill_pipeline_proto(self, self.head_id, message)
        return message

    def deliver_result(
        self, result: StepResult, trace: list[pb.HopTrace], sender_id: str, num_bytes: int
    ) -> None:
        if self._spot is None:
            self._deliver(result, trace, sender_id, num_bytes)
            return
        # Checked steps wait for their re-runs; bans apply once the step is handed on.
        ready = self._spot.arrive(result)
        if ready and not is_shadow(result.step_id):
            self._deliver(ready[0], trace, sender_id, num_bytes)
        else:
            for done in ready:
                self._flights.complete(done)
        self._members.drop_banned()

    def _deliver(
        self, result: StepResult, trace: list[pb.HopTrace], sender_id: str, num_bytes: int
    ) -> None:
        if result.failure_kind is FailureKind.KV_FULL and result.failed_node_id:
            self.routes.mark_full(result.failed_node_id)
        elif result.failure_kind is FailureKind.UNREACHABLE and result.failed_node_id:
            self._detection.suspect(
                result.failed_node_id, result.error or "a step could not reach it"
            )
        flight = self._flights.get((result.step_id, result.micro_batch))
        trace = self._routed_trace(result, trace, flight.route if flight else None)
        if result.error is None:
            self._hops.count(trace, sender_id, num_bytes)
            if flight is not None:
                self._telemetry.record_step(flight.num_tokens, trace, flight.decode_only)
        timings = trace_to_timings(trace)
        self._flights.complete(dataclasses.replace(result, stage_timings=timings))

    def _routed_trace(
        self, result: StepResult, trace: list[pb.HopTrace], route: Route | None
    ) -> list[pb.HopTrace]:
        """``trace`` when it names the nodes of the step's route, else nothing."""
        if route is None:
            return []  # no step of this head: nothing to check it against
        problem = trace_problem(trace, route, complete=result.error is None)
        if problem is None:
            return trace
        logger.warning(
            "head %s ignores step %d's timings: %s", self.head_id, result.step_id, problem
        )
        return []

    # -- discovery (molink.discovery.watch) --------------------------------------

    def known_nodes(self) -> dict[str, NodeInfo]:
        return {s.node_id: s for s in self._registry.view().stages}

    def admit_discovered(self, info: NodeInfo) -> str | None:
        """A node found in the DHT joins as if it had called Join; None when admitted."""
        return self._members.admit_discovered(info)

    def drop_node(self, node_id: str, reason: str) -> None:
        stage = self._registry.view().stage(node_id)
        if stage is not None:
            self._stage_down(stage, reason)

    def read_records_from(self, record_times: Callable[[], dict[str, RecordTimes]]) -> None:
        """Where ``record_times`` comes from: the DHT watch, when the head runs one."""
        self._record_times = record_times

    def record_times(self) -> dict[str, RecordTimes]:
        """When each node's DHT record was last seen renewed and when it expires (empty
        without the DHT)."""
        return self._record_times()

    def add_closer(self, close: Callable[[], None]) -> None:
        """Run ``close`` when the head closes (discovery threads, the DHT)."""
        self._closers.append(close)

    def _stage_down(
        self, stage: NodeInfo, detail: str, kind: FailureKind = FailureKind.UNREACHABLE
    ) -> None:
        self._members.stage_down(stage, detail, kind)
