"""The swarm as a pipeline head sees it: its registry, health checks, stage timings and
link estimates, and the nodes' DHT records when the head reads them.

The provider remembers nodes it has seen, so that a node the head dropped still shows, as
dead, with the layers it took along, until ``retention_s`` passes or it rejoins. With the
DHT, a node's record age is the time since it last renewed its record (records say their
lifetime); a node that let two renewals pass is "missing" even while its health checks
still answer.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from molink.dashboard.snapshot import Health, LinkView, NodeView, SwarmSnapshot
from molink.engine.protocol import EngineStats
from molink.engine.telemetry import LinkEstimate, StageTiming
from molink.transport.generated import molink_pb2 as pb

if TYPE_CHECKING:
    # Annotations only: importing molink.pipeline loads gRPC and the TLS stack (~25 MiB
    # resident), which a single-node server, whose dashboard imports this module, never uses.
    from molink.pipeline.identity import NodeInfo
    from molink.pipeline.registry import PipelineView, RecordTimes

DEAD_RETENTION_S = 300.0
# A stage whose compute per layer is this many times the median of its peers' is "slow".
SLOW_FACTOR = 3.0
# Nodes renew their DHT record every third of its lifetime; a record older than two thirds
# of it missed a renewal (the head reads the DHT every sixth, so a live node's looks up to
# half its lifetime old).
MISSED_RENEWAL_FRACTION = 2 / 3


@runtime_checkable
class HeadView(Protocol):
    """What a pipeline head offers (molink.pipeline.head.PipelineExecutor has all of it)."""

    def pipeline(self) -> PipelineView: ...

    def stage_health(self) -> dict[str, pb.HealthResponse | str]: ...

    def stage_timings(self) -> list[StageTiming]: ...

    def link_estimates(self) -> list[LinkEstimate]: ...


@runtime_checkable
class RecoveryCounters(Protocol):
    """Offered by a head that moves requests between routes when a node fails."""

    def failovers_total(self) -> int: ...

    def replays_total(self) -> int: ...


@runtime_checkable
class RoutingHead(Protocol):
    """Offered by a head that routes among replicas."""

    def route_nodes(self) -> tuple[NodeInfo, ...]:
        """The nodes, head first, of the route a new sequence would take now."""


@runtime_checkable
class DhtRecords(Protocol):
    """Offered by a head that reads the swarm's DHT (empty when it does not)."""

    def record_times(self) -> dict[str, RecordTimes]: ...


@runtime_checkable
class BannedNodes(Protocol):
    """Offered by a head that spot-checks its nodes."""

    def banned_nodes(self) -> dict[str, str]:
        """Node id -> why it was banned."""


@dataclass
class _Seen:
    info: NodeInfo
    renewed_at: float  # wall time of its latest answer (or of the join)
    answer: object = None  # the latest health answer object seen, to spot a new one
    gone_at: float | None = None


class PipelineSwarmProvider:
    def __init__(
        self,
        head: HeadView,
        stats: Callable[[], EngineStats],
        clock: Callable[[], float] = time.time,
        retention_s: float = DEAD_RETENTION_S,
    ) -> None:
        self._head = head
        self._stats = stats
        self._clock = clock
        self._retention_s = retention_s
        self._seen: dict[str, _Seen] = {}

    def route(self) -> tuple[str, ...]:
        """The nodes a new sequence takes now: with replicas, one of each span, as the
        head's router chose (all stages would name every replica as one route)."""
        view = self._head.pipeline()
        if view.readiness() is not None:
            return ()
        nodes = self._head.route_nodes() if isinstance(self._head, RoutingHead) else view.stages
        # A head with no route answers its stages: shown as a route only if they chain.
        return tuple(n.node_id for n in nodes) if _chains(nodes, view.num_layers) else ()

    def snapshot(self) -> SwarmSnapshot:
        now = self._clock()
        view = self._head.pipeline()
        health = self._head.stage_health()
        self._remember(view, health, now)
        timings = {t.node_id: t for t in self._head.stage_timings() if t.samples}
        slow = _slow_nodes(view.stages, timings)
        stats = self._stats()
        free_tokens = stats.kv_free_blocks * view.stages[0].block_size if view.stages else 0
        records = self._head.record_times() if isinstance(self._head, DhtRecords) else {}
        nodes = [
            _with_record(
                self._node(stage, view, health.get(stage.node_id), timings, slow, free_tokens, now),
                records.get(stage.node_id),
                now,
            )
            for stage in view.stages
        ]
        nodes += [
            _with_record(self._dead(seen, health.get(node_id), now), records.get(node_id), now)
            for node_id, seen in self._gone()
        ]
        bans = self._head.banned_nodes() if isinstance(self._head, BannedNodes) else {}
        nodes = [_with_ban(node, bans.get(node.node_id)) for node in nodes]
        counters = self._head if isinstance(self._head, RecoveryCounters) else None
        route = self.route()
        return SwarmSnapshot(
            model=view.stages[0].model.served_name if view.stages else "",
            num_layers=view.num_layers,
            nodes=tuple(nodes),
            links=tuple(_link(e) for e in self._head.link_estimates()),
            routes=(route,) if route else (),
            failovers_total=counters.failovers_total() if counters else 0,
            replays_total=counters.replays_total() if counters else 0,
            taken_at=now,
        )

    def _remember(self, view: PipelineView, health: dict, now: float) -> None:
        current = {s.node_id for s in view.stages}
        for stage in view.stages:
            seen = self._seen.get(stage.node_id)
            if seen is None or seen.gone_at is not None or seen.info != stage:
                seen = self._seen[stage.node_id] = _Seen(stage, now)
            answer = health.get(stage.node_id)
            if isinstance(answer, pb.HealthResponse) and answer is not seen.answer:
                seen.answer, seen.renewed_at = answer, now
            if stage.node_id == view.head_id:
                seen.renewed_at = now  # the head is this process
        for node_id, seen in list(self._seen.items()):
            if node_id in current:
                continue
            if seen.gone_at is None:
                seen.gone_at = now
            elif now - seen.gone_at > self._retention_s:
                del self._seen[node_id]

    def _gone(self) -> list[tuple[str, _Seen]]:
        return sorted(
            ((i, s) for i, s in self._seen.items() if s.gone_at is not None),
            key=lambda item: item[1].info.layers.start,
        )

    def _node(
        self,
        stage: NodeInfo,
        view: PipelineView,
        answer: pb.HealthResponse | str | None,
        timings: dict[str, StageTiming],
        slow: dict[str, str],
        free_tokens: int,
        now: float,
    ) -> NodeView:
        is_head = stage.node_id == view.head_id
        health, detail = _health_of(answer, is_head)
        if health == "alive" and stage.node_id in slow:
            health, detail = "slow", slow[stage.node_id]
        timing = timings.get(stage.node_id)
        report = answer if isinstance(answer, pb.HealthResponse) else None
        stats = self._stats() if is_head else None
        return NodeView(
            node_id=stage.node_id,
            address=stage.address,
            start=stage.layers.start,
            end=stage.layers.end,
            health=health,
            detail=detail,
            dtype=stage.dtype,
            **_device_of(stage),
            step_time_s=timing.compute_s_per_step if timing else None,
            queued_steps=report.queued_steps if report else (stats.num_waiting if stats else None),
            active_sequences=(
                report.active_sequences if report else (stats.num_running if stats else None)
            ),
            **_kv_of(stage, report, free_tokens),
            record_age_s=max(0.0, now - self._seen[stage.node_id].renewed_at),
            is_head=is_head,
        )

    def _dead(self, seen: _Seen, answer: pb.HealthResponse | str | None, now: float) -> NodeView:
        info = seen.info
        return NodeView(
            node_id=info.node_id,
            address=info.address,
            start=info.layers.start,
            end=info.layers.end,
            health="dead",
            detail=answer if isinstance(answer, str) else "left the pipeline",
            dtype=info.dtype,
            **_device_of(info),
            kv_total_tokens=info.kv_capacity_tokens,
            record_age_s=max(0.0, now - seen.renewed_at),
        )


def _kv_of(
    stage: NodeInfo, report: pb.HealthResponse | None, head_free_tokens: int
) -> dict[str, int]:
    """A node's KV as its health answer reports its own pool; a node that reports none
    takes the block ids the head chooses, so the head's free count is its own."""
    if report is not None and report.total_kv_blocks:
        return {
            "kv_free_tokens": report.free_kv_blocks * stage.block_size,
            "kv_total_tokens": report.total_kv_blocks * stage.block_size,
        }
    return {
        "kv_free_tokens": min(head_free_tokens, stage.kv_capacity_tokens),
        "kv_total_tokens": stage.kv_capacity_tokens,
    }


def _chains(nodes: tuple[NodeInfo, ...], num_layers: int) -> bool:
    """Whether ``nodes``, in order, compute layers 0 to ``num_layers`` one after another."""
    covered = 0
    for node in nodes:
        if node.layers.start != covered:
            return False
        covered = node.layers.end
    return bool(nodes) and covered == num_layers


def _with_ban(node: NodeView, reason: str | None) -> NodeView:
    if reason is None:
        return node
    return dataclasses.replace(node, health="banned", detail=f"banned: {reason}")


def _device_of(info: NodeInfo) -> dict[str, str | int | None]:
    """The NodeView fields of where a node computes, as its Join or DHT record says."""
    reported = info.memory_total_bytes > 0
    return {
        "device": info.device,
        "memory_total_bytes": info.memory_total_bytes if reported else None,
        "memory_free_bytes": info.memory_free_bytes if reported else None,
    }


def _with_record(node: NodeView, record: RecordTimes | None, now: float) -> NodeView:
    """``node`` with its DHT record's times; "missing" if a live node missed renewals."""
    if record is None:
        return node
    age = max(0.0, now - record.renewed_at)
    expires = max(0.0, record.expires_at - now)
    lifetime = max(1e-6, record.expires_at - record.renewed_at)
    health, detail = node.health, node.detail
    if node.health == "dead":
        detail = f"{detail}; its DHT record expires in {expires:.0f}s"
    elif not node.is_head and age > MISSED_RENEWAL_FRACTION * lifetime:
        health = "missing"
        detail = f"its DHT record was not renewed for {age:.0f}s (expires in {expires:.0f}s)"
    return dataclasses.replace(
        node, health=health, detail=detail, record_age_s=age, record_expires_s=expires
    )


def _health_of(answer: pb.HealthResponse | str | None, is_head: bool) -> tuple[Health, str]:
    if is_head:
        return "alive", ""
    if answer is None:
        return "alive", "joined; not checked yet"
    if isinstance(answer, str):
        return "missing", answer
    if answer.status == pb.HEALTH_STATUS_DEGRADED:
        return "slow", answer.message
    return "alive", answer.message


def _slow_nodes(stages: tuple[NodeInfo, ...], timings: dict[str, StageTiming]) -> dict[str, str]:
    per_layer = {
        s.node_id: timings[s.node_id].compute_s_per_step / max(1, s.layers.end - s.layers.start)
        for s in stages
        if s.node_id in timings and timings[s.node_id].compute_s_per_step > 0
    }
    if len(per_layer) < 2:
        return {}
    median = statistics.median(per_layer.values())
    return {
        node_id: f"computes a layer {value / median:.1f}x slower than the median node"
        for node_id, value in per_layer.items()
        if value > SLOW_FACTOR * median
    }


def _link(estimate: LinkEstimate) -> LinkView:
    """Nodes report their own links in their health answers: a number that is no
    measurement (not finite, or negative) shows as unknown, as an unmeasured one does (a
    NaN made every snapshot fail to serialize)."""
    source, _, target = estimate.hop.partition("->")
    measured = estimate.samples > 0
    bandwidth, rtt = estimate.bandwidth_bytes_per_s, estimate.rtt_s
    return LinkView(
        source=source,
        target=target,
        bandwidth_bytes_per_s=bandwidth if measured and _a_measurement(bandwidth) else None,
        rtt_s=rtt if measured and _a_measurement(rtt) else None,
        samples=estimate.samples,
    )


def _a_measurement(value: float) -> bool:
    return math.isfinite(value) and value >= 0
