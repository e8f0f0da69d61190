"""The head's telemetry: stage compute fits, hops assembled from every node's reports,
and their Prometheus lines."""

from __future__ import annotations

import math
import random

from molink.config import LayerRange
from molink.engine.async_engine import AsyncLLMEngine
from molink.engine.offline import LLM
from molink.engine.telemetry import LinkEstimate
from molink.pipeline.head_telemetry import ComputeEstimator, HeadTelemetry, metric_lines
from molink.pipeline.identity import NodeInfo
from molink.pipeline.links import OutgoingLink
from molink.pipeline.registry import PipelineView
from molink.pipeline.toy import toy_identity
from molink.pipeline.wire import link_to_proto
from molink.transport.generated import molink_pb2 as pb

MODEL = toy_identity(6, hidden_size=64)


def test_compute_fit_recovers_the_cost_per_token() -> None:
    rng = random.Random(0)
    estimator = ComputeEstimator("s1")
    for _ in range(200):
        tokens = rng.choice([1, 4, 8, 64, 256, 512])
        estimator.add(tokens, 0.010 + 0.0005 * tokens + rng.uniform(-0.001, 0.001))
    timing = estimator.timing()
    assert abs(timing.compute_s_per_token - 0.0005) <= 0.05 * 0.0005
    assert timing.compute_s_per_step > 0.010 and timing.samples == 200


def test_compute_without_spread_in_sizes_is_the_plain_ratio() -> None:
    estimator = ComputeEstimator("s1")
    for _ in range(10):
        estimator.add(8, 0.016)
    timing = estimator.timing()
    assert math.isclose(timing.compute_s_per_token, 0.002)
    assert math.isclose(timing.compute_s_per_step, 0.016)


def _node(node_id: str, start: int, end: int, wire: str = "float16") -> NodeInfo:
    return NodeInfo(node_id, MODEL, LayerRange(start, end), f"{node_id}:1", wire_dtype=wire)


VIEW = PipelineView(
    head_id="head",
    head_address="head:1",
    epoch=3,
    num_layers=6,
    stages=(_node("head", 0, 2), _node("s1", 2, 4, wire="int8"), _node("s2", 4, 6)),
)


class _Links:
    def outgoing(self) -> list[OutgoingLink]:
        return [
            OutgoingLink("head", "s1", LinkEstimate("head->s1", 6e6, 0.02, 50)),
            OutgoingLink("other-head", "x", LinkEstimate("head->x", 1.0, 9.0, 1)),
        ]


def _health() -> dict[str, pb.HealthResponse | str]:
    s1 = pb.HealthResponse(
        links=[
            link_to_proto("head", "s1", "s2", LinkEstimate("s1->s2", 2.5e6, 0.06, 40)),
            link_to_proto("other-head", "s1", "s2", LinkEstimate("s1->s2", 1.0, 9.0, 1)),
        ]
    )
    return {"s1": s1, "s2": "unreachable: DEADLINE_EXCEEDED"}


def test_hops_come_in_pipeline_order_from_every_reporter() -> None:
    telemetry = HeadTelemetry("head", lambda: VIEW, _Links(), _health)
    links = telemetry.link_estimates()
    assert [e.hop for e in links] == ["head->s1", "s1->s2", "s2->head"]
    assert links[0] == LinkEstimate("head->s1", 6e6, 0.02, 50)
    assert links[1] == LinkEstimate("s1->s2", 2.5e6, 0.06, 40)
    assert links[2].samples == 0 and math.isinf(links[2].bandwidth_bytes_per_s)


def test_stage_timings_and_bytes_per_token() -> None:
    telemetry = HeadTelemetry("head", lambda: VIEW, _Links(), _health)
    telemetry.record_step(4, [pb.HopTrace(node_id="head", compute_s=0.01)])
    timings = telemetry.stage_timings()
    assert [(t.node_id, t.samples) for t in timings] == [("head", 1), ("s1", 0), ("s2", 0)]
    # s1 sends int8 rows: 64 bytes and a float32 scale; the head float16: 128 bytes.
    assert telemetry.hidden_bytes_per_token() == 128


def test_single_node_pipeline_has_no_hops() -> None:
    solo = PipelineView("head", "head:1", 1, 6, (_node("head", 0, 6),))
    telemetry = HeadTelemetry("head", lambda: solo, _Links(), dict)
    assert telemetry.link_estimates() == [] and telemetry.hidden_bytes_per_token() == 0


def test_metric_lines() -> None:
    telemetry = HeadTelemetry("head", lambda: VIEW, _Links(), _health)
    lines = metric_lines(telemetry)
    assert 'molink:link_bandwidth_bytes_per_second{hop="head->s1"} 6000000.0' in lines
    assert 'molink:link_bandwidth_bytes_per_second{hop="s2->head"} +Inf' in lines
    assert 'molink:link_rtt_seconds{hop="s1->s2"} 0.06' in lines
    assert 'molink:stage_compute_seconds_per_step{node="s2"} 0.0' in lines
    assert "molink:hidden_bytes_per_token 128" in lines
    assert "# TYPE molink:link_rtt_seconds gauge" in lines


def test_the_async_engine_exposes_the_lines_it_is_given(tiny_model_dir) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=16)
    lines = ['molink:link_rtt_seconds{hop="head->s1"} 0.02']
    for source, expected in ((lambda: lines, lines), (None, [])):
        engine = AsyncLLMEngine(llm.engine, "tiny", 64, metric_lines=source)
        try:
            assert engine.metric_lines() == expected
        finally:
            engine.shutdown()


def test_decodes_alone_keep_the_cost_per_token_fitted_over_prefills() -> None:
    """Prompts prefilled at first (spread in sizes), then a window of decodes only: the
    marginal cost stays the one fitted, not the decodes' ratio, which counts each step's
    fixed cost per token (the replay budget is sized by it)."""
    estimator = ComputeEstimator("s1")
    for tokens in (512, 8, 256, 8, 448, 8):
        estimator.add(tokens, 0.040 + 0.001 * tokens)
    assert math.isclose(estimator.timing().compute_s_per_token, 0.001)
    for _ in range(200):  # the prefills leave the window
        estimator.add(8, 0.040 + 0.001 * 8)
    assert math.isclose(estimator.timing().compute_s_per_token, 0.001)
    # A ratio below the remembered slope (the node got faster) wins: it bounds the cost.
    for _ in range(200):
        estimator.add(8, 0.004)
    assert math.isclose(estimator.timing().compute_s_per_token, 0.0005)
