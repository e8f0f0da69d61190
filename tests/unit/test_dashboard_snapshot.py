"""The swarm snapshot: coverage, missing spans, node health from the head's view, history."""

from __future__ import annotations

import math

from molink.config import LayerRange
from molink.dashboard.history import MetricsHistory, percentile
from molink.dashboard.pipeline_provider import PipelineSwarmProvider
from molink.dashboard.providers import StageSwarmProvider, StaticSwarmProvider
from molink.dashboard.snapshot import NodeView, SwarmSnapshot
from molink.engine.protocol import EngineStats
from molink.engine.telemetry import LinkEstimate, StageTiming
from molink.outputs import CompletionOutput, RequestMetrics, RequestOutput
from molink.pipeline.identity import ModelIdentity, NodeInfo
from molink.pipeline.registry import PipelineView
from molink.transport.generated import molink_pb2 as pb

MODEL = ModelIdentity("m", "f", 30, 64, 100)


def _node(node_id: str, start: int, end: int, health: str = "alive") -> NodeView:
    return NodeView(node_id, "", start, end, health)  # type: ignore[arg-type]


def test_coverage_counts_serving_nodes_and_finds_gaps() -> None:
    snapshot = SwarmSnapshot(
        "m",
        10,
        (_node("a", 0, 4), _node("b", 2, 6, "slow"), _node("c", 6, 8, "dead"), _node("d", 8, 9)),
    )
    assert snapshot.coverage() == [1, 1, 2, 2, 1, 1, 0, 0, 1, 0]
    spans = [(s.start, s.end) for s in snapshot.missing_spans()]
    assert spans == [(6, 8), (9, 10)]
    body = snapshot.to_json()
    assert body["missing_spans"] == [{"start": 6, "end": 8}, {"start": 9, "end": 10}]
    assert body["version"] == 1 and body["nodes"][2]["health"] == "dead"


def _info(node_id: str, start: int, end: int) -> NodeInfo:
    return NodeInfo(node_id, MODEL, LayerRange(start, end), f"{node_id}:1", 10, 16)


class FakeHead:
    """A head with two stages; tests change its registry, health answers and timings."""

    def __init__(self) -> None:
        self.stages = [_info("head", 0, 15), _info("s1", 15, 30)]
        self.health: dict[str, pb.HealthResponse | str] = {
            "s1": pb.HealthResponse(status=pb.HEALTH_STATUS_SERVING, queued_steps=3)
        }
        self.timings = [StageTiming("head", 0.01, 0.001, 5), StageTiming("s1", 0.01, 0.001, 5)]
        self.failovers = 0

    def pipeline(self) -> PipelineView:
        return PipelineView("head", "head:1", 1, 30, tuple(self.stages))

    def stage_health(self) -> dict[str, pb.HealthResponse | str]:
        return dict(self.health)

    def stage_timings(self) -> list[StageTiming]:
        return self.timings

    def link_estimates(self) -> list[LinkEstimate]:
        return [
            LinkEstimate("head->s1", 1.25e6, 0.002, 4),
            LinkEstimate("s1->head", math.inf, 0.0, 0),
        ]

    def failovers_total(self) -> int:
        return self.failovers

    def replays_total(self) -> int:
        return 2


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _provider(head: FakeHead, clock: Clock) -> PipelineSwarmProvider:
    return PipelineSwarmProvider(head, lambda: EngineStats(1, 2, 10, 4), clock=clock)


def test_pipeline_provider_reports_nodes_links_and_counters() -> None:
    head, clock = FakeHead(), Clock()
    snapshot = _provider(head, clock).snapshot()
    nodes = {n.node_id: n for n in snapshot.nodes}
    assert [(n.start, n.end, n.health) for n in snapshot.nodes] == [
        (0, 15, "alive"),
        (15, 30, "alive"),
    ]
    assert nodes["head"].is_head and nodes["s1"].queued_steps == 3
    assert nodes["s1"].kv_free_tokens == 4 * 16 and nodes["s1"].kv_total_tokens == 160
    assert nodes["s1"].step_time_s == 0.01
    assert snapshot.routes == (("head", "s1"),)
    assert snapshot.links[0].bandwidth_bytes_per_s == 1.25e6 and snapshot.links[0].rtt_s == 0.002
    assert snapshot.links[1].bandwidth_bytes_per_s is None and snapshot.links[1].rtt_s is None
    assert (snapshot.failovers_total, snapshot.replays_total) == (0, 2)
    head.failovers = 3
    assert _provider(head, clock).snapshot().failovers_total == 3


def test_a_failing_then_dropped_stage_shows_missing_then_dead_with_its_span_uncovered() -> None:
    head, clock = FakeHead(), Clock()
    provider = _provider(head, clock)
    provider.snapshot()
    clock.now += 1.5
    head.health["s1"] = "unreachable: connection refused"
    failing = provider.snapshot()
    assert failing.nodes[1].health == "missing"
    assert failing.nodes[1].record_age_s == 1.5
    assert failing.missing_spans()[0].start == 15
    clock.now += 1.0
    head.stages = head.stages[:1]  # the head dropped it
    dropped = provider.snapshot()
    dead = dropped.nodes[-1]
    assert (dead.node_id, dead.health, dead.start, dead.end) == ("s1", "dead", 15, 30)
    assert "connection refused" in dead.detail and dead.record_age_s == 2.5
    assert [(s.start, s.end) for s in dropped.missing_spans()] == [(15, 30)]
    assert dropped.routes == () and provider.route() == ()
    head.stages.append(_info("s1", 15, 30))  # it rejoins
    head.health["s1"] = pb.HealthResponse(status=pb.HEALTH_STATUS_SERVING)
    assert [n.health for n in provider.snapshot().nodes] == ["alive", "alive"]


def test_dead_nodes_are_forgotten_after_the_retention() -> None:
    head, clock = FakeHead(), Clock()
    provider = PipelineSwarmProvider(head, lambda: EngineStats(0, 0, 10, 10), clock, 60.0)
    provider.snapshot()
    head.stages = head.stages[:1]
    assert len(provider.snapshot().nodes) == 2
    clock.now += 61
    assert len(provider.snapshot().nodes) == 1


def test_slow_and_degraded_stages() -> None:
    head, clock = FakeHead(), Clock()
    head.stages.append(_info("s2", 29, 30))
    head.stages[1] = _info("s1", 15, 29)
    head.health["s2"] = pb.HealthResponse(status=pb.HEALTH_STATUS_SERVING)
    head.timings = [
        StageTiming("head", 0.015, 0, 5),
        StageTiming("s1", 0.014, 0, 5),
        StageTiming("s2", 0.02, 0, 5),  # one layer at 20 ms: 20x the others' per-layer time
    ]
    nodes = {n.node_id: n for n in _provider(head, clock).snapshot().nodes}
    assert nodes["s2"].health == "slow" and "slower than the median" in nodes["s2"].detail
    assert nodes["s1"].health == "alive"
    head.health["s1"] = pb.HealthResponse(status=pb.HEALTH_STATUS_DEGRADED, message="stalled")
    nodes = {n.node_id: n for n in _provider(head, clock).snapshot().nodes}
    assert (nodes["s1"].health, nodes["s1"].detail) == ("slow", "stalled")


def test_static_provider() -> None:
    snapshot = StaticSwarmProvider("m", 30).snapshot()
    assert snapshot.coverage() == [1] * 30 and snapshot.routes == (("local",),)
    assert StaticSwarmProvider("m", 0).snapshot().nodes == ()


def test_stage_provider_shows_the_heads_latest_view() -> None:
    head = FakeHead()
    view: list[PipelineView | None] = [None]
    provider = StageSwarmProvider("s1", 30, lambda: view[0])
    assert provider.snapshot().nodes == () and provider.route() == ()
    assert [(s.start, s.end) for s in provider.snapshot().missing_spans()] == [(0, 30)]
    view[0] = head.pipeline()
    snapshot = provider.snapshot()
    assert [(n.node_id, n.is_head) for n in snapshot.nodes] == [("head", True), ("s1", False)]
    assert snapshot.nodes[0].detail == "as last reported by the head"
    assert snapshot.routes == (("head", "s1"),) and snapshot.missing_spans() == []


def _finished(arrival: float, first: float, done: float, tokens: int) -> RequestOutput:
    choice = CompletionOutput(0, "x", list(range(tokens)), finish_reason="length")
    return RequestOutput("r", [1], [choice], True, RequestMetrics(arrival, None, first, done))


def test_history_samples_once_a_second_with_rates_and_percentiles() -> None:
    clock = Clock()
    history = MetricsHistory(lambda: EngineStats(2, 1, 10, 5), lambda: (1, 4), clock)
    for ttft in (0.1, 0.2, 0.3, 0.4):
        history.observe(_finished(0.0, ttft, ttft + 0.9, 10))  # 0.1 s between tokens
    assert history.sample_if_due()
    assert not history.sample_if_due()  # not a second later
    (point,) = history.points()
    assert point["tokens_per_s"] == 40 / 10.0
    assert (point["ttft_p50"], point["ttft_p99"]) == (0.2, 0.4)
    assert math.isclose(point["itl_p90"], 0.1)
    assert (point["running"], point["waiting"], point["kv_usage"]) == (2, 1, 0.5)
    assert (point["failovers_total"], point["replays_total"]) == (1, 4)
    clock.now += 11  # the requests leave the window
    assert history.sample_if_due()
    latest = history.points(since=point["t"])
    assert len(latest) == 1 and latest[0]["tokens_per_s"] == 0 and latest[0]["ttft_p50"] is None


def test_percentile_nearest_rank() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([1.0] * 99 + [5.0], 99) == 1.0
    assert percentile([1.0] * 99 + [5.0], 100) == 5.0


def test_a_single_process_engine_shows_one_node_with_every_layer(tiny_model_dir) -> None:
    from molink.dashboard.providers import provider_for
    from molink.engine.async_engine import AsyncLLMEngine
    from molink.engine.offline import LLM

    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=16)
    engine = AsyncLLMEngine(llm.engine, "tiny", 64)
    try:
        snapshot = provider_for(engine).snapshot()
    finally:
        engine.shutdown()
    num_layers = llm.engine.executor.stages[-1].layer_range.end
    assert num_layers > 0 and snapshot.num_layers == num_layers
    assert [(n.start, n.end) for n in snapshot.nodes] == [(0, num_layers)]


class BanningHead(FakeHead):
    def __init__(self) -> None:
        super().__init__()
        self.bans: dict[str, str] = {}

    def banned_nodes(self) -> dict[str, str]:
        return dict(self.bans)


def test_a_banned_node_shows_banned_with_the_reason_and_its_span_uncovered() -> None:
    head, clock = BanningHead(), Clock()
    provider = _provider(head, clock)
    assert [n.health for n in provider.snapshot().nodes] == ["alive", "alive"]
    head.bans["s1"] = "its hidden states disagreed with two replicas that agreed"
    head.stages = head.stages[:1]  # the head evicted it
    snapshot = provider.snapshot()
    banned = snapshot.nodes[1]
    assert (banned.node_id, banned.health) == ("s1", "banned")
    assert banned.detail == "banned: its hidden states disagreed with two replicas that agreed"
    assert [(s.start, s.end) for s in snapshot.missing_spans()] == [(15, 30)]


def test_a_node_that_owns_its_kv_shows_its_own_free_kv_not_the_heads() -> None:
    # Each node allocates its own KV blocks and reports its pool in its health answer; the
    # head's free blocks say nothing about it (the dashboard showed the head's 4 free).
    head, clock = FakeHead(), Clock()
    head.health["s1"] = pb.HealthResponse(
        status=pb.HEALTH_STATUS_SERVING, total_kv_blocks=12, free_kv_blocks=1
    )
    s1 = _provider(head, clock).snapshot().nodes[1]
    assert (s1.kv_free_tokens, s1.kv_total_tokens) == (1 * 16, 12 * 16)


class RoutingFakeHead(FakeHead):
    """A head with a replica of s1's span, whose router sends new sequences to it."""

    def __init__(self) -> None:
        super().__init__()
        self.stages.append(_info("s1b", 15, 30))

    def route_nodes(self) -> tuple[NodeInfo, ...]:
        return (self.stages[0], self.stages[2])


def test_with_replicas_the_route_shown_is_the_one_the_router_takes() -> None:
    # All stages were shown as one route, head -> s1 -> s1b, which no step takes.
    head, clock = RoutingFakeHead(), Clock()
    provider = _provider(head, clock)
    assert provider.route() == ("head", "s1b")
    assert provider.snapshot().routes == (("head", "s1b"),)
    head.stages = head.stages[:1]  # layers missing: no route at all
    assert provider.route() == () and provider.snapshot().routes == ()


class BadLinksHead(FakeHead):
    """A stage whose health answers report its link with numbers that are no measurement."""

    def link_estimates(self) -> list[LinkEstimate]:
        return [
            LinkEstimate("head->s1", math.nan, math.nan, 4),
            LinkEstimate("s1->head", -5.0, math.inf, 3),
        ]


def test_a_peers_unusable_link_numbers_show_as_unknown_and_the_snapshot_still_serializes() -> None:
    # A NaN round trip went into the snapshot as is: json.dumps(allow_nan=False) raised on
    # every snapshot and event, and the dashboard stayed blank while the report lasted.
    import json

    snapshot = _provider(BadLinksHead(), Clock()).snapshot()
    for link in snapshot.links:
        assert link.bandwidth_bytes_per_s is None and link.rtt_s is None
    json.dumps(snapshot.to_json(), allow_nan=False)


class RoutelessHead(RoutingFakeHead):
    """Its router finds no route (e.g. every replica avoided): it answers every stage."""

    def route_nodes(self) -> tuple[NodeInfo, ...]:
        return tuple(self.stages)


def test_without_a_route_no_route_is_shown() -> None:
    # Every layer served but no route to take: all stages were shown as the route.
    provider = _provider(RoutelessHead(), Clock())
    assert provider.route() == () and provider.snapshot().routes == ()
