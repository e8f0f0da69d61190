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

Starting a head::

    head = PipelineExecutor(stage0_executor, info, TransportConfig()).start()
    head.readiness()  # "layers [20, 40) are not served by any node" until stages join
    head.submit(plan); results = head.poll(0.1)
    head.close()
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable

import torch

from molink.config import LayerRange
from molink.engine.recovery import NodeFailure, RecoveryStats
from molink.engine.telemetry import LinkEstimate, StageTiming
from molink.errors import PipelineError
from molink.pipeline.deadlines import DeadlinePolicy, StepClock, StepDeadlines
from molink.pipeline.failover import FailoverDesk
from molink.pipeline.head_metrics import HopCounters, PipelineMetrics, swarm_metric_lines
from molink.pipeline.head_spot_checks import HeadSpotChecks
from molink.pipeline.head_telemetry import HeadTelemetry, fill_pipeline_proto, metric_lines
from molink.pipeline.health import HealthMonitor
from molink.pipeline.identity import NodeInfo
from molink.pipeline.mirroring import is_shadow
from molink.pipeline.node import StageNode
from molink.pipeline.outbound import OutboundRelease
from molink.pipeline.registry import JoinRefusedError, PipelineView, RecordTimes, StageRegistry
from molink.pipeline.route_book import RouteBook
from molink.pipeline.swarm_view import SwarmView
from molink.pipeline.wire import node_from_proto, view_to_proto
from molink.pipeline.worker import ReleaseJob, StepJob
from molink.placement.route import Route
from molink.placement.router import best_route
from molink.security.spot_check import tolerance_for
from molink.stage.protocol import StageExecutor
from molink.step import FailureKind, StepPlan, StepResult
from molink.transport.config import TransportConfig
from molink.transport.convert import trace_to_timings
from molink.transport.generated import molink_pb2 as pb

logger = logging.getLogger(__name__)

StepKey = tuple[int, int]  # (step_id, micro_batch)


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
        self._registry = StageRegistry(info)
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
        self._results: queue.Queue[StepResult] = queue.Queue()
        self._lock = threading.Lock()
        # The one record of each step in flight here: its route, deadlines and size.
        self._in_flight: dict[StepKey, Flight] = {}
        self._failover = FailoverDesk(info.node_id, self.config, self._node.submit)
        self._deadlines = StepDeadlines(
            DeadlinePolicy(self.config.deadline_floor_s, self.config.deadline_factor),
            self.config.step_timeout_s,
            self._telemetry.timings_by_node,
            self._monitor.round_trips,
        )
        # (tokens, carries no prefill chunk) of the steps in flight, for timings
        self._lost: dict[str, tuple[NodeInfo, str]] = {}
        self._hops: dict[str, HopCounters] = {}
        self._completed = self._failed = self._sampled = 0
        self._stop = threading.Event()
        self._deadline_thread = threading.Thread(
            target=self._deadline_loop, name="head-deadlines", daemon=True
        )
        self._started = False
        # Spot checks (--molink-verify-fraction): compared within the dtypes' rounding.
        tolerance = tolerance_for(input_dtype or torch.float32, info.dtype, info.wire_dtype)
        self._spot = HeadSpotChecks(verify_fraction, tolerance) if verify_fraction > 0 else None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> PipelineExecutor:
        """Bind the gRPC server, start the compute, deadline and health threads."""
        self._node.start()
        self._registry.set_head_address(self._node.address)
        self._node.links.apply(self._registry.view())
        self._deadline_thread.start()
        self._monitor.start()
        self._started = True
        logger.info("head %s at %s: %s", self.head_id, self.address, self.readiness() or "ready")
        return self

    def close(self) -> None:
        for close in self._closers:
            close()
        self._stop.set()
        self._monitor.stop()
        self._node.stop()
        self._fail_in_flight("the pipeline executor was closed")

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
        gone = self._gone_from(route)
        if route is None or gone is not None:
            not_ready = not_ready or gone or f"no route takes step {plan.step_id}'s sequences"
            # Its sequences wait for a route (replay), up to the failover timeout.
            self._results.put(
                _error_result(
                    key, f"the pipeline is not ready: {not_ready}", FailureKind.UNREACHABLE
                )
            )
            with self._lock:
                self._failed += 1
            return
        plan = self._release_elsewhere(plan, route)
        with self._lock:
            if key in self._in_flight:
                logger.warning("step %d (micro-batch %d) submitted twice", *key)
            ahead = sum(1 for f in self._in_flight.values() if f.route.key == route.key)
            self._in_flight[key] = Flight(
                route,
                self._deadlines.clock_for(route, plan.num_tokens, ahead),
                plan.num_tokens,
                _is_decode_only(plan),
            )
        mirror = self._spot.plan(plan, route, self._registry.view().stages) if self._spot else None
        job = StepJob(self.head_id, route, plan, None, trusted=True, mirror=mirror)
        try:
            self._node.submit(job)
        except PipelineError as exc:
            self._complete(_error_result(key, str(exc)))

    def _gone_from(self, route: Route | None) -> str | None:
        """Why ``route`` cannot be used: a node of it was evicted since it was chosen."""
        if route is None:
            return None
        view = self._registry.view()
        for hop in route.hops[1:]:
            if view.stage(hop.node_id) is None:
                return f"node {hop.node_id} of route {route.key} is gone"
        return None

    def poll(self, timeout: float) -> list[StepResult]:
        try:
            results = [self._results.get(timeout=max(0.0, timeout))]
        except queue.Empty:
            return []
        while True:
            try:
                results.append(self._results.get_nowait())
            except queue.Empty:
                return results

    def release(self, seq_ids: list[int]) -> None:
        """In band: each route's nodes free its sequences after the steps already sent."""
        if not seq_ids:
            return
        groups = self.routes.forget(seq_ids)
        routed = {s for _, ids in groups.values() for s in ids}
        local = tuple(s for s in seq_ids if s not in routed)
        if local:  # never sent anywhere: only this node's own stage may know them
            self._node.submit(ReleaseJob(self.head_id, None, local, propagate=False))
        for route, ids in groups.values():
            self._node.submit(ReleaseJob(self.head_id, route, tuple(ids), propagate=True))
        for route, shadows in self._spot.release(seq_ids) if self._spot else []:
            hop = route.hops[1]  # the head holds no shadow: they start at the next node
            sender = self._node.links.forward_to(hop.address, hop.node_id)
            sender.put(OutboundRelease(self.head_id, route, shadows))

    def _release_elsewhere(self, plan: StepPlan, route: Route) -> StepPlan:
        """Finished sequences of other routes are released along their own routes; the
        plan carries only those of its own."""
        if not plan.finished_seq_ids:
            return plan
        groups = self.routes.forget(list(plan.finished_seq_ids))
        keep = [s for s in plan.finished_seq_ids if all(s not in ids for _, ids in groups.values())]
        for other, ids in groups.values():
            if other.key == route.key:
                keep += ids
            else:
                self._node.submit(ReleaseJob(self.head_id, other, tuple(ids), propagate=True))
        return dataclasses.replace(plan, finished_seq_ids=tuple(keep))

    def route_nodes(self) -> tuple[NodeInfo, ...]:
        """The nodes of the route a new sequence would take now (telemetry follows it)."""
        view = self._registry.view()
        route = self.routes.route_for_new(0)
        if route is None:
            return view.stages
        by_id = {s.node_id: s for s in view.stages}
        return tuple(by_id[h.node_id] for h in route.hops if h.node_id in by_id)

    def readiness(self) -> str | None:
        view = self._registry.view()
        missing = view.missing_ranges()
        message = view.readiness() or self._route_gap()
        if message is None:
            return None
        with self._lock:
            notes = [
                reason
                for lost, reason in self._lost.values()
                if any(_overlaps(lost.layers, m) for m in missing)
            ]
        return "; ".join([message, *notes])

    # -- metrics ---------------------------------------------------------------------------

    def metrics(self) -> PipelineMetrics:
        with self._lock:
            return PipelineMetrics(
                hops=dict(self._hops),
                head_bytes_sent=self._node.links.bytes_sent(),
                steps_completed=self._completed,
                steps_failed=self._failed,
                sampled_tokens=self._sampled,
            )

    # -- RecoverySource (molink.engine.recovery) and the dashboard's RecoveryCounters ------

    def take_failures(self) -> list[NodeFailure]:
        return self._failover.take()

    def recovery_stats(self) -> RecoveryStats:
        return self._failover.stats

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
        stage = self._registry.view().stage(node_id)
        if stage is None or node_id == self.head_id:
            return False
        self._stage_down(stage, reason, kind)
        return self._registry.view().stage(node_id) is None

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
        node = node_from_proto(request.node)
        try:
            view = self._join(node)
        except JoinRefusedError as exc:
            logger.warning("head %s refused node %r: %s", self.head_id, node.node_id, exc.reason)
            return pb.JoinResponse(accepted=False, reason=exc.reason)
        self._monitor.forget(node.node_id, node.address)
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
        self._apply_view(view, skip=node.node_id)
        return pb.JoinResponse(accepted=True, pipeline=view_to_proto(view))

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
                self._stage_down(other, f"{failure}; {node.node_id} joined for its layers")
        return self._registry.view() if view.epoch != self._registry.view().epoch else view

    def _route_gap(self) -> str | None:
        """Every layer is served, yet no chain of spans meets end to end."""
        snap = self.swarm.snapshot()
        if best_route(snap.head, snap.nodes, snap.num_layers, snap.head_address) is not None:
            return None
        return (
            f"no chain of nodes covers layers [0, {snap.num_layers}): the spans served "
            f"({', '.join(f'[{n.start}, {n.end})' for n in snap.nodes)}) do not meet end to end"
        )

    # -- discovery (molink.discovery.watch) --------------------------------------

    def known_nodes(self) -> dict[str, NodeInfo]:
        return {s.node_id: s for s in self._registry.view().stages}

    def admit_discovered(self, info: NodeInfo) -> str | None:
        """A node found in the DHT joins as if it had called Join; None when admitted."""
        try:
            view = self._join(info)
        except JoinRefusedError as exc:
            return exc.reason
        self._monitor.forget(info.node_id, info.address)
        logger.info(
            "head %s: node %s found in the DHT (epoch %d)",
            self.head_id,
            info.describe(),
            view.epoch,
        )
        self._apply_view(view)
        return None

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

    def route_of_step(self, step_id: int, micro_batch: int) -> Route | None:
        if self._spot is not None and is_shadow(step_id):
            return self._spot.route_of(step_id, micro_batch)
        with self._lock:
            flight = self._in_flight.get((step_id, micro_batch))
            return flight.route if flight else None

    def pipeline_proto(self) -> pb.Pipeline:
        message = view_to_proto(self._registry.view())
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
                self._complete(done)
        self._drop_banned()

    def _deliver(
        self, result: StepResult, trace: list[pb.HopTrace], sender_id: str, num_bytes: int
    ) -> None:
        if result.failure_kind is FailureKind.KV_FULL and result.failed_node_id:
            self.routes.mark_full(result.failed_node_id)
        elif result.failure_kind is FailureKind.UNREACHABLE and result.failed_node_id:
            self._suspect(result.failed_node_id, result.error or "a step could not reach it")
        if result.error is None:
            self._count_hops(trace, sender_id, num_bytes, result)
            with self._lock:
                flight = self._in_flight.get((result.step_id, result.micro_batch))
            if flight is not None:
                self._telemetry.record_step(flight.num_tokens, trace, flight.decode_only)
        timings = trace_to_timings(trace)
        self._complete(dataclasses.replace(result, stage_timings=timings))

    # -- internals -------------------------------------------------------------------------

    def _drop_banned(self) -> None:
        """Nodes the spot checks convicted leave the routes; the sequences whose KV they
        held are replayed on other routes (evict_node)."""
        for ban in self._spot.bans.snapshot() if self._spot else []:
            if self._registry.view().stage(ban.node_id) is not None:
                self.evict_node(ban.node_id, f"banned: {ban.reason}")

    def _complete(self, result: StepResult) -> None:
        """Hand a step's outcome to poll() once; late or duplicate outcomes are dropped."""
        key = (result.step_id, result.micro_batch)
        with self._lock:
            if self._in_flight.pop(key, None) is None:
                logger.debug("dropping a late outcome of step %d (micro-batch %d)", *key)
                return
            if result.error is None:
                self._completed += 1
                self._sampled += len(result.sampled)
            else:
                self._failed += 1
        if result.error is not None:
            logger.warning("step %d (micro-batch %d) failed: %s", *key, result.error)
        self._results.put(result)

    def _count_hops(
        self, trace: list[pb.HopTrace], sender_id: str, num_bytes: int, result: StepResult
    ) -> None:
        hops = [
            (a.node_id, b.node_id, b.bytes_received) for a, b in zip(trace, trace[1:], strict=False)
        ]
        if sender_id != self.head_id:
            hops.append((sender_id, self.head_id, num_bytes))
        with self._lock:
            for src, dst, size in hops:
                name = f"{src}->{dst}"
                old = self._hops.get(name, HopCounters())
                self._hops[name] = HopCounters(old.messages + 1, old.bytes + size)

    def _fail_in_flight(
        self, reason: str, through: str | None = None, kind: FailureKind = FailureKind.NONE
    ) -> None:
        """Fail the steps in flight (only those whose route passes ``through``, if given)."""
        with self._lock:
            keys = [
                key
                for key, flight in self._in_flight.items()
                if through is None or flight.route.contains(through)
            ]
        for key in keys:
            self._complete(_error_result(key, reason, kind, through or ""))

    def _deadline_loop(self) -> None:
        tick = min(0.2, self.config.deadline_floor_s / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                overdue = [
                    (key, flight.clock, flight.route)
                    for key, flight in self._in_flight.items()
                    if flight.clock.deadline < now
                ]
            if overdue:
                self._handle_overdue(overdue)

    def _handle_overdue(self, overdue: list[tuple[StepKey, StepClock, Route | None]]) -> None:
        """Probe the nodes of the overdue steps' routes; evict those that do not answer
        (their steps fail with them); steps whose nodes all answer get another deadline,
        up to their hard one."""
        nodes: dict[str, NodeInfo] = {}
        view = self._registry.view()
        for _, _, route in overdue:
            for hop in route.hops[1:] if route else ():
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
        for key, clock, route in overdue:
            if now < clock.hard_deadline:
                with self._lock:
                    if key in self._in_flight:
                        clock.extend(now)
                continue
            message = (
                f"step {key[0]} (micro-batch {key[1]}) got no result within "
                f"{now - clock.sent_at:.1f}s on route {route.key if route else '?'}"
            )
            self._complete(_error_result(key, message, FailureKind.DEADLINE))

    def peer_broke(self, address: str, reason: str) -> None:
        """HeadRole: the stream to a node broke; whether it is gone, a probe decides."""
        for stage in self._registry.view().stages:
            if stage.address == address and stage.node_id != self.head_id:
                self._suspect(stage.node_id, reason)

    def _suspect(self, node_id: str, detail: str) -> None:
        """A step could not reach ``node_id``: no new sequences go there while a probe (in
        the background) decides whether it is gone."""
        stage = self._registry.view().stage(node_id)
        if stage is None or node_id == self.head_id:
            return
        self.routes.avoid(node_id, self.config.health_timeout_s + 1.0)

        def probe() -> None:
            failure = self._monitor.probe(stage)
            if failure is not None:
                self._stage_down(
                    stage, f"{detail}; then a probe failed: {failure}", FailureKind.UNREACHABLE
                )

        threading.Thread(target=probe, name="head-probe", daemon=True).start()

    def _stage_down(
        self, stage: NodeInfo, detail: str, kind: FailureKind = FailureKind.UNREACHABLE
    ) -> None:
        """Evict ``stage``: its steps in flight fail (typed, so their sequences are
        replayed), and every sequence whose route went through it is freed on the other
        nodes and handed to the engine for replay."""
        if self._registry.remove(stage.node_id) is None:
            return
        reason = f"stage {stage.describe()} stopped answering ({detail})"
        with self._lock:
            self._lost[stage.node_id] = (stage, reason)
        # Fail the steps first, so that they carry this reason rather than the one of the
        # sender that closing its stream gives.
        self._fail_in_flight(f"{reason}; the step was lost", through=stage.node_id, kind=kind)
        self._failover.node_lost(stage, kind, detail, self.routes.evict(stage.node_id))
        for held in self._spot.node_down(stage.node_id) if self._spot else []:
            self._complete(held)  # its re-runs will not come: hand the step on unverified
        self._node.links.drop_peer(stage.address)
        self._apply_view(self._registry.view())

    def _apply_view(self, view: PipelineView, skip: str | None = None) -> None:
        self._node.links.apply(view)
        self._monitor.push_view(view, skip=skip)


@dataclasses.dataclass
class Flight:
    """A step in flight: the route it took, its deadlines, and its size (for timings)."""

    route: Route
    clock: StepClock
    num_tokens: int
    decode_only: bool


def _is_decode_only(plan: StepPlan) -> bool:
    return all(s.num_new_tokens <= 1 for s in plan.scheduled)


def _overlaps(a: LayerRange, b: LayerRange) -> bool:
    return a.start < b.end and b.start < a.end


def _error_result(
    key: StepKey, message: str, kind: FailureKind = FailureKind.NONE, node_id: str = ""
) -> StepResult:
    return StepResult(
        step_id=key[0], micro_batch=key[1], error=message, failure_kind=kind, failed_node_id=node_id
    )
