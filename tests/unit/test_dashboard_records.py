"""The dashboard's view of DHT records, and the head's watch of them: record age, expiry,
missed renewals, a dropped node's leftover record not bringing it back; each node's device."""

from __future__ import annotations

import dataclasses

from molink.config import LayerRange
from molink.dashboard.pipeline_provider import PipelineSwarmProvider
from molink.discovery.dht import SwarmRecord
from molink.discovery.watch import DiscoveryWatch
from molink.engine.protocol import EngineStats
from molink.pipeline.identity import NodeInfo
from molink.pipeline.registry import RecordTimes
from tests.unit.test_dashboard_snapshot import MODEL, Clock, FakeHead

TTL_S = 15.0


class DhtHead(FakeHead):
    def __init__(self) -> None:
        super().__init__()
        self.records: dict[str, RecordTimes] = {}

    def record_times(self) -> dict[str, RecordTimes]:
        return dict(self.records)


def test_record_age_and_expiry_come_from_the_dht_and_missed_renewals_show_missing() -> None:
    head, clock = DhtHead(), Clock()
    provider = PipelineSwarmProvider(head, lambda: EngineStats(0, 0, 10, 10), clock=clock)
    head.records["s1"] = RecordTimes(clock.now - 4.0, clock.now - 4.0 + TTL_S)
    s1 = provider.snapshot().nodes[1]
    assert (s1.health, s1.record_age_s, s1.record_expires_s) == ("alive", 4.0, 11.0)
    clock.now += 7.0  # 11 s without a renewal: two renewal periods (5 s each) passed
    s1 = provider.snapshot().nodes[1]
    assert s1.health == "missing" and "not renewed for 11s (expires in 4s)" in s1.detail
    assert provider.snapshot().missing_spans()[0].start == 15
    head.stages = head.stages[:1]  # the head dropped it; its record lingers
    clock.now += 1.0
    dead = provider.snapshot().nodes[1]
    assert dead.health == "dead" and "its DHT record expires in 3s" in dead.detail
    head.records.clear()  # it expired
    assert provider.snapshot().nodes[1].record_expires_s is None


class FakeDirectory:
    """Records by node id: (info, seconds until it expires); each says its lifetime TTL_S."""

    def __init__(self) -> None:
        self.entries: dict[str, tuple[NodeInfo, float]] = {}

    def records(self) -> list[SwarmRecord]:
        return [SwarmRecord(i, left, max(0.0, TTL_S - left)) for i, left in self.entries.values()]

    def left(self) -> set[str]:
        return set()


class FakeDiscoveringHead:
    head_id = "head"

    def __init__(self) -> None:
        self.known: dict[str, NodeInfo] = {}
        self.admitted: list[str] = []

    def known_nodes(self) -> dict[str, NodeInfo]:
        return dict(self.known)

    def admit_discovered(self, info: NodeInfo) -> str | None:
        self.admitted.append(info.node_id)
        self.known[info.node_id] = info
        return None

    def drop_node(self, node_id: str, reason: str) -> None:
        self.known.pop(node_id, None)


def test_a_node_dropped_by_the_head_comes_back_only_when_it_renews_its_record() -> None:
    directory, head, clock = FakeDirectory(), FakeDiscoveringHead(), Clock()
    watch = DiscoveryWatch(directory, head, interval_s=1.0, clock=clock)  # type: ignore[arg-type]
    stage = NodeInfo("s1", MODEL, LayerRange(15, 30), "s1:1")
    directory.entries["s1"] = (stage, TTL_S)
    watch.check_once()
    assert head.admitted == ["s1"]
    first = watch.record_times()["s1"]
    assert first.expires_at - first.renewed_at == TTL_S
    late = NodeInfo("s2", MODEL, LayerRange(15, 30), "s2:1")
    directory.entries["s2"] = (late, TTL_S - 5.0)  # first seen 5 s after it was announced
    watch.check_once()
    seen = watch.record_times()["s2"]
    assert abs(seen.expires_at - seen.renewed_at - TTL_S) < 1e-6  # its age is the record's
    del directory.entries["s2"]
    watch.check_once()
    head.admitted.remove("s2")
    head.known.clear()  # its health checks failed: the head dropped it
    directory.entries["s1"] = (stage, TTL_S - 2.0)  # the same record, older
    watch.check_once()
    assert head.admitted == ["s1"]  # a dead node's leftover record does not bring it back
    assert watch.record_times()["s1"] == first
    directory.entries["s1"] = (stage, TTL_S + 5.0)  # it renewed (5 s later): alive after all
    watch.check_once()
    assert head.admitted == ["s1", "s1"]
    assert watch.record_times()["s1"].renewed_at >= first.renewed_at
    directory.entries.clear()  # expired: dropped
    clock.now += TTL_S + 5.0
    watch.check_once()
    assert "s1" not in head.known and watch.record_times() == {}


def test_a_node_killed_right_after_renewing_its_record_does_not_come_back() -> None:
    """The record was renewed between two checks, and the node was then killed and
    evicted before the second: that renewal predates the eviction."""
    directory, head = FakeDirectory(), FakeDiscoveringHead()
    watch = DiscoveryWatch(directory, head, interval_s=1.0)  # type: ignore[arg-type]
    stage = NodeInfo("s1", MODEL, LayerRange(15, 30), "s1:1")
    directory.entries["s1"] = (stage, TTL_S - 10.0)
    watch.check_once()
    directory.entries["s1"] = (stage, TTL_S)  # renewed, then killed
    head.known.clear()  # evicted by the head
    for _ in range(3):
        watch.check_once()
    assert head.admitted == ["s1"]
    directory.entries["s1"] = (stage, TTL_S + 5.0)  # a renewal after the eviction: alive
    watch.check_once()
    assert head.admitted == ["s1", "s1"]


def test_each_node_shows_its_device_and_memory_as_it_reported_them() -> None:
    head, clock = FakeHead(), Clock()
    gib = 1 << 30
    head.stages[1] = dataclasses.replace(
        head.stages[1], device="cuda:0", memory_total_bytes=80 * gib, memory_free_bytes=12 * gib
    )
    provider = PipelineSwarmProvider(head, lambda: EngineStats(0, 0, 10, 10), clock=clock)
    local, gpu = provider.snapshot().nodes
    assert (local.device, local.memory_total_bytes, local.memory_free_bytes) == ("cpu", None, None)
    assert (gpu.device, gpu.memory_total_bytes, gpu.memory_free_bytes) == (
        "cuda:0",
        80 * gib,
        12 * gib,
    )
    head.stages = head.stages[:1]
    assert provider.snapshot().nodes[1].device == "cuda:0"  # a dead node keeps its device
