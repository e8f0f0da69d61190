"""PipelineExecutor: the head's side of the pipeline (molink.engine.executor.PlanExecutor).

The head computes stage 0 itself on its compute thread, streams the hidden states to
stage 1 from a sender thread, and receives sampled tokens from the last stage on its
ReturnResults servicer. It keeps the registry of stages (joins arrive on its gRPC
server), checks every stage's health, and guarantees that every submitted step comes back
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
from dataclasses import dataclass

import torch

from molink.config import LayerRange
from molink.engine.telemetry import LinkEstimate, StageTiming
from molink.errors import PipelineError
from molink.pipeline.head_telemetry import HeadTelemetry, fill_pipeline_proto, metric_lines
from molink.pipeline.health import HealthMonitor
from molink.pipeline.identity import NodeInfo
from molink.pipeline.node import StageNode
from molink.pipeline.registry import JoinRefusedError, PipelineView, StageRegistry
from molink.pipeline.wire import node_from_proto, view_to_proto
from molink.pipeline.worker import ReleaseJob, StepJob
from molink.stage.protocol import StageExecutor
from molink.step import StepPlan, StepResult
from molink.transport.config import TransportConfig
from molink.transport.convert import trace_to_timings
from molink.transport.generated import molink_pb2 as pb

logger = logging.getLogger(__name__)

StepKey = tuple[int, int]  # (step_id, micro_batch)


@dataclass(frozen=True)
class HopCounters:
    messages: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class PipelineMetrics:
    """Bytes on each hop ("a->b") of the steps that came back, for bytes-per-token."""

    hops: dict[str, HopCounters]
    head_bytes_sent: int  # everything the head streamed, including failed steps
    steps_completed: int
    steps_failed: int
    sampled_tokens: int

    @property
    def bytes_on_wire(self) -> int:
        return sum(hop.bytes for hop in self.hops.values())

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_on_wire / self.sampled_tokens if self.sampled_tokens else 0.0

    def metric_lines(self) -> list[str]:
        """Prometheus counters of the traffic, for /metrics (bytes per token = the sum of
        molink:pipeline_bytes_sent_total over hops / molink:pipeline_sampled_tokens_total)."""
        lines: list[str] = []
        for name, help_text, field in (
            ("molink:pipeline_bytes_sent_total", "Bytes sent on each hop by completed steps.", "bytes"),
            ("molink:pipeline_messages_total", "Messages sent on each hop by completed steps.", "messages"),
        ):  # fmt: skip
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            for hop, counters in sorted(self.hops.items()):
                lines.append(f'{name}{{hop="{_label(hop)}"}} {getattr(counters, field)}')
        for name, help_text, value in (
            ("molink:pipeline_head_bytes_sent_total", "Bytes the head streamed, failed steps included.", self.head_bytes_sent),
            ("molink:pipeline_sampled_tokens_total", "Tokens sampled by completed steps.", self.sampled_tokens),
        ):  # fmt: skip
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        name = "molink:pipeline_steps_total"
        lines += [f"# HELP {name} Steps that came back, by outcome.", f"# TYPE {name} counter"]
        lines.append(f'{name}{{outcome="completed"}} {self.steps_completed}')
        lines.append(f'{name}{{outcome="failed"}} {self.steps_failed}')
        return lines


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
            self._node.node_id, self._registry.view, self._node.links, self._monitor.latest
        )
        self._results: queue.Queue[StepResult] = queue.Queue()
        self._lock = threading.Lock()
        self._in_flight: dict[StepKey, float] = {}  # -> deadline (monotonic)
        # (tokens, carries no prefill chunk) of the steps in flight, for timings
        self._step_tokens: dict[StepKey, tuple[int, bool]] = {}
        self._lost: dict[str, tuple[NodeInfo, str]] = {}
        self._hops: dict[str, HopCounters] = {}
        self._completed = self._failed = self._sampled = 0
        self._stop = threading.Event()
        self._deadline_thread = threading.Thread(
            target=self._deadline_loop, name="head-deadlines", daemon=True
        )
        self._started = False

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
        if not_ready is not None:
            self._results.put(_error_result(key, f"the pipeline is not ready: {not_ready}"))
            with self._lock:
                self._failed += 1
            return
        with self._lock:
            if key in self._in_flight:
                logger.warning("step %d (micro-batch %d) submitted twice", *key)
            self._in_flight[key] = time.monotonic() + self.config.step_timeout_s
            self._step_tokens[key] = (plan.num_tokens, _is_decode_only(plan))
        job = StepJob(self.head_id, self.pipeline().epoch, plan, None, trusted=True)
        try:
            self._node.submit(job)
        except PipelineError as exc:
            self._complete(_error_result(key, str(exc)))

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
        """In band: stages free the sequences after the steps already sent to them."""
        if seq_ids:
            epoch = self.pipeline().epoch
            self._node.submit(ReleaseJob(self.head_id, epoch, tuple(seq_ids), propagate=True))

    def readiness(self) -> str | None:
        view = self._registry.view()
        missing = view.missing_ranges()
        message = view.readiness()
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

    def stage_health(self) -> dict[str, pb.HealthResponse | str]:
        """The latest health answer of each stage (or why there is none)."""
        return self._monitor.latest()

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
        return [*metric_lines(self), *self.metrics().metric_lines()]

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
        """Admit ``node``; a replacement may take the layers of stages that are gone
        before the health monitor has noticed."""
        try:
            return self._registry.join(node)
        except JoinRefusedError:
            in_the_way = self._registry.overlapping(node)
            if not in_the_way or any(s.node_id == self.head_id for s in in_the_way):
                raise
            failures = [self._monitor.probe(stage) for stage in in_the_way]
            if any(failure is None for failure in failures):
                raise
            for stage, failure in zip(in_the_way, failures, strict=True):
                self._stage_down(stage, f"{failure}; replaced by {node.node_id}")
            return self._registry.join(node)

    def pipeline_proto(self) -> pb.Pipeline:
        message = view_to_proto(self._registry.view())
        message.readiness = self.readiness() or ""
        fill_pipeline_proto(self, self.head_id, message)
        return message

    def deliver_result(
        self, result: StepResult, trace: list[pb.HopTrace], sender_id: str, num_bytes: int
    ) -> None:
        if result.error is None:
            self._count_hops(trace, sender_id, num_bytes, result)
            with self._lock:
                num_tokens, decode_only = self._step_tokens.get(
                    (result.step_id, result.micro_batch), (0, False)
                )
            self._telemetry.record_step(num_tokens, trace, decode_only)
        timings = trace_to_timings(trace)
        self._complete(dataclasses.replace(result, stage_timings=timings))

    # -- internals -------------------------------------------------------------------------

    def _complete(self, result: StepResult) -> None:
        """Hand a step's outcome to poll() once; late or duplicate outcomes are dropped."""
        key = (result.step_id, result.micro_batch)
        with self._lock:
            self._step_tokens.pop(key, None)
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

    def _fail_in_flight(self, reason: str) -> None:
        with self._lock:
            keys = list(self._in_flight)
        for key in keys:
            self._complete(_error_result(key, reason))

    def _deadline_loop(self) -> None:
        tick = min(0.2, self.config.step_timeout_s / 4)
        while not self._stop.wait(tick):
            now = time.monotonic()
            with self._lock:
                expired = [key for key, deadline in self._in_flight.items() if deadline < now]
            if not expired:
                continue
            route = " -> ".join(s.node_id for s in self._registry.view().stages)
            for key in expired:
                self._complete(
                    _error_result(
                        key,
                        f"step {key[0]} (micro-batch {key[1]}) got no result within "
                        f"{self.config.step_timeout_s:g}s on route {route}",
                    )
                )

    def _stage_down(self, stage: NodeInfo, detail: str) -> None:
        if self._registry.remove(stage.node_id) is None:
            return
        reason = f"stage {stage.describe()} stopped answering ({detail})"
        logger.error("head %s: %s; dropping it from the pipeline", self.head_id, reason)
        with self._lock:
            self._lost[stage.node_id] = (stage, reason)
        # Fail the steps first, so that they carry this reason rather than the one of the
        # sender that the new view closes.
        self._fail_in_flight(f"{reason}; the step was lost")
        self._apply_view(self._registry.view())

    def _apply_view(self, view: PipelineView, skip: str | None = None) -> None:
        self._node.links.apply(view)
        self._monitor.push_view(view, skip=skip)


def _is_decode_only(plan: StepPlan) -> bool:
    return all(s.num_new_tokens <= 1 for s in plan.scheduled)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _overlaps(a: LayerRange, b: LayerRange) -> bool:
    return a.start < b.end and b.start < a.end


def _error_result(key: StepKey, message: str) -> StepResult:
    return StepResult(step_id=key[0], micro_batch=key[1], error=message)
