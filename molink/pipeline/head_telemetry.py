"""What the head knows of its pipeline's speed (molink.engine.telemetry.PipelineTelemetry).

* Links: the head's own Forward stream measures the first hop; every other node measures
  its outgoing streams (to the next stage, and the last stage's results to the head) and
  reports them in its Health answers, which the head polls anyway.
* Stages: every result carries each stage's compute time (HopTrace); the head knows how
  many tokens the step had, and fits time per step and per token from both.

They are published as Prometheus gauges (``metric_lines``) and in the head's GetPipeline
answer (``fill_pipeline_proto``), which ``molink status`` shows.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Mapping

from molink.engine.telemetry import LinkEstimate, PipelineTelemetry, StageTiming
from molink.pipeline.identity import NodeInfo
from molink.pipeline.links import LinkTable
from molink.pipeline.registry import PipelineView
from molink.pipeline.wire import link_from_proto, link_to_proto, timing_to_proto
from molink.transport.codec import wire_row_bytes
from molink.transport.generated import molink_pb2 as pb

STEP_SMOOTHING = 0.2  # EWMA weight of the newest step
TOKEN_WINDOW = 64  # steps in the per-token fit
# The per-token slope needs steps of clearly different sizes; without them, time per
# token is the plain ratio (an upper bound of the marginal cost).
MIN_TOKEN_SPREAD = 2.0


def _smoothed(previous: float | None, sample: float) -> float:
    if previous is None:
        return sample
    return STEP_SMOOTHING * sample + (1 - STEP_SMOOTHING) * previous


class ComputeEstimator:
    """One stage's compute time: an EWMA per step, and the marginal cost per token from a
    least-squares line ``time = fixed + per_token * tokens`` over recent steps."""

    def __init__(self, node_id: str) -> None:
        self.node_id = node_id
        self._per_step: float | None = None
        self._per_decode_step: float | None = None
        self._steps: deque[tuple[int, float]] = deque(maxlen=TOKEN_WINDOW)
        self._count = 0
        # The last slope fitted over steps of clearly different sizes. Once the prompts'
        # prefills have left the window, decodes alone have no spread, and their ratio
        # counts each step's fixed cost as cost per token (several times the marginal
        # cost on a CPU): a replay budget sized by it rebuilt KV a block per plan.
        self._slope: float | None = None
        # timing() until the next step: the router reads it several times per step.
        self._timing: StageTiming | None = None

    def add(self, num_tokens: int, compute_s: float, decode_only: bool = False) -> None:
        if num_tokens <= 0 or not math.isfinite(compute_s) or compute_s < 0:
            return
        self._count += 1
        self._timing = None
        self._per_step = _smoothed(self._per_step, compute_s)
        if decode_only:
            self._per_decode_step = _smoothed(self._per_decode_step, compute_s)
        self._steps.append((num_tokens, compute_s))

    def timing(self) -> StageTiming:
        if self._timing is None:
            self._timing = StageTiming(
                node_id=self.node_id,
                compute_s_per_step=self._per_step or 0.0,
                compute_s_per_token=self._per_token(),
                samples=self._count,
                compute_s_per_decode_step=self._per_decode_step or 0.0,
            )
        return self._timing

    def _per_token(self) -> float:
        if not self._steps:
            return 0.0
        tokens = [float(n) for n, _ in self._steps]
        times = [t for _, t in self._steps]
        ratio = sum(times) / sum(tokens)
        if max(tokens) < MIN_TOKEN_SPREAD * min(tokens):
            return ratio if self._slope is None else min(self._slope, ratio)
        mean_n, mean_t = sum(tokens) / len(tokens), sum(times) / len(times)
        var = sum((n - mean_n) ** 2 for n in tokens)
        cov = sum((n - mean_n) * (t - mean_t) for n, t in zip(tokens, times, strict=True))
        slope = cov / var
        # Noise can tilt the line below zero; a step never gets cheaper with more tokens.
        if slope <= 0:
            return ratio
        self._slope = slope
        return slope


class HeadTelemetry:
    """Implements PipelineTelemetry for a head (see the module docstring)."""

    def __init__(
        self,
        head_id: str,
        view: Callable[[], PipelineView],
        links: LinkTable,
        health: Callable[[], dict[str, pb.HealthResponse | str]],
        route: Callable[[], tuple[NodeInfo, ...]] | None = None,
    ) -> None:
        self._head_id = head_id
        self._view = view
        # The nodes of the route most steps take (default: every registered node, which
        # is that route while no span has a replica).
        self._route = route or (lambda: view().stages)
        self._links = links
        self._health = health
        self._lock = threading.Lock()
        self._compute: dict[str, ComputeEstimator] = {}
        # node id -> (its latest health answer, the links it reports): an answer is read
        # on every step by the router, and converted once.
        self._reported: dict[str, tuple[pb.HealthResponse, list[LinkEstimate]]] = {}

    def record_step(
        self, num_tokens: int, trace: list[pb.HopTrace], decode_only: bool = False
    ) -> None:
        """A step of ``num_tokens`` tokens (``decode_only``: no prefill chunk among them)
        came back with every stage's trace."""
        with self._lock:
            for hop in trace:
                estimator = self._compute.get(hop.node_id)
                if estimator is None:
                    estimator = self._compute[hop.node_id] = ComputeEstimator(hop.node_id)
                estimator.add(num_tokens, hop.compute_s, decode_only)

    def prune(self, view: PipelineView) -> None:
        """Forget the compute estimates of nodes no longer in ``view`` (a swarm's churn
        mints node ids; a node taken back starts measuring afresh)."""
        members = {s.node_id for s in view.stages}
        with self._lock:
            for node_id in [n for n in self._compute if n not in members]:
                del self._compute[node_id]

    def link_estimates(self) -> list[LinkEstimate]:
        stages = self._route()
        if len(stages) < 2:
            return []  # a single node sends nothing
        known = self.known_links()
        hops = itertools.pairwise([*stages, stages[0]])
        return [
            known.get(f"{a.node_id}->{b.node_id}")
            or LinkEstimate(f"{a.node_id}->{b.node_id}", math.inf, 0.0, 0)
            for a, b in hops
        ]

    def stage_timings(self) -> list[StageTiming]:
        route = self._route()  # outside the lock: the router reads these timings too
        with self._lock:
            return [
                self._compute[s.node_id].timing()
                if s.node_id in self._compute
                else StageTiming(s.node_id, 0.0, 0.0, 0)
                for s in route
            ]

    def timings_by_node(self) -> dict[str, StageTiming]:
        """Every node measured so far, replicas included."""
        with self._lock:
            return {node_id: est.timing() for node_id, est in self._compute.items()}

    def hidden_bytes_per_token(self) -> int:
        """The widest activation row any hop carries (stages may use other wire dtypes)."""
        senders = self._route()[:-1]
        rows = (wire_row_bytes(s.model.hidden_size, s.wire_dtype) for s in senders)
        return max(rows, default=0)

    def known_links(self) -> dict[str, LinkEstimate]:
        """Every hop measured: the head's own streams, and what nodes report of theirs
        (Forward streams are shared by every head, so they carry no head id)."""
        known = {
            out.estimate.hop: out.estimate
            for out in self._links.outgoing()
            if out.head_id in ("", self._head_id)
        }
        reported: dict[str, tuple[pb.HealthResponse, list[LinkEstimate]]] = {}
        for node_id, answer in self._health().items():
            if not isinstance(answer, pb.HealthResponse):
                continue
            seen = self._reported.get(node_id)
            if seen is None or seen[0] is not answer:
                seen = (answer, self._links_reported(node_id, answer))
            reported[node_id] = seen
            known.update((estimate.hop, estimate) for estimate in seen[1])
        self._reported = reported  # answers no longer current are let go
        return known

    def _links_reported(self, node_id: str, answer: pb.HealthResponse) -> list[LinkEstimate]:
        return [
            link_from_proto(report)
            for report in answer.links
            if report.head_id in ("", self._head_id) and report.from_node_id == node_id
        ]


def fill_pipeline_proto(telemetry: PipelineTelemetry, head_id: str, message: pb.Pipeline) -> None:
    """Add the head's measurements to its GetPipeline answer (for ``molink status``)."""
    for estimate in telemetry.link_estimates():
        source, _, target = estimate.hop.partition("->")
        message.links.append(link_to_proto(head_id, source, target, estimate))
    message.timings.extend(timing_to_proto(t) for t in telemetry.stage_timings())
    message.hidden_bytes_per_token = telemetry.hidden_bytes_per_token()


def fill_measured_speed(
    message: pb.Pipeline, head_tokens_per_s: float, health: Mapping[str, pb.HealthResponse | str]
) -> None:
    """Each node's own measured tokens/s in the view: the head's from its worker, every
    other node's from its latest health answer (a node's record from its join still has
    the 0 of a node that has computed nothing yet). ``layer_step_s`` comes with the join."""
    for index, stage in enumerate(message.stages):
        if index == 0 and stage.node_id == message.head_id:
            stage.throughput_tokens_per_s = head_tokens_per_s
            continue
        answer = health.get(stage.node_id)
        if isinstance(answer, pb.HealthResponse):
            stage.throughput_tokens_per_s = answer.throughput_tokens_per_s


def metric_lines(telemetry: PipelineTelemetry) -> list[str]:
    """Prometheus gauges of every hop and stage, for /metrics."""
    links = telemetry.link_estimates()
    timings = telemetry.stage_timings()
    lines: list[str] = []
    for name, help_text, label, values in (
        (
            "molink:link_bandwidth_bytes_per_second",
            "Estimated bandwidth of each hop (+Inf until a large message was measured).",
            "hop",
            [(e.hop, e.bandwidth_bytes_per_s) for e in links],
        ),
        (
            "molink:link_rtt_seconds",
            "Estimated round trip of each hop.",
            "hop",
            [(e.hop, e.rtt_s) for e in links],
        ),
        (
            "molink:link_samples",
            "Messages each hop's estimate is based on.",
            "hop",
            [(e.hop, float(e.samples)) for e in links],
        ),
        (
            "molink:stage_compute_seconds_per_step",
            "Smoothed compute time of one micro-batch step on each stage.",
            "node",
            [(t.node_id, t.compute_s_per_step) for t in timings],
        ),
        (
            "molink:stage_compute_seconds_per_token",
            "Marginal compute time per scheduled token on each stage.",
            "node",
            [(t.node_id, t.compute_s_per_token) for t in timings],
        ),
    ):
        if not values:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} gauge"]
        lines += [f'{name}{{{label}="{_escape(key)}"}} {_value(v)}' for key, v in values]
    name = "molink:hidden_bytes_per_token"
    lines += [
        f"# HELP {name} Bytes one token's activations take on the wire.",
        f"# TYPE {name} gauge",
        f"{name} {telemetry.hidden_bytes_per_token()}",
    ]
    return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _value(value: float) -> str:
    return "+Inf" if value == math.inf else repr(float(value))
