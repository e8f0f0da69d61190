"""The pipeline view (GetPipeline, ``molink status``) carries each node's measured speed:
the seconds per decoder layer it measured at start, and its tokens/s of compute."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from molink.config import LayerRange
from molink.pipeline.head import PipelineExecutor
from molink.pipeline.identity import NodeInfo
from molink.pipeline.node import StageNode
from molink.pipeline.status import pipeline_status
from molink.pipeline.toy import ToyStageExecutor, toy_identity
from molink.pipeline.wire import node_from_proto, node_to_proto
from molink.sampling_params import SamplingParams
from molink.step import NewSequenceData, ScheduledSequence, StepPlan
from molink.transport.channel import NodeClient
from molink.transport.config import TransportConfig

MODEL = toy_identity(4)
CONFIG = TransportConfig(health_interval_s=0.2, health_timeout_s=1.0)


def _info(node_id: str, start: int, end: int, step_s: float) -> NodeInfo:
    return NodeInfo(
        node_id, MODEL, LayerRange(start, end), "127.0.0.1:0", 64, 16, layer_step_s=step_s
    )


@pytest.fixture
def pipeline() -> Iterator[tuple[PipelineExecutor, StageNode]]:
    head = PipelineExecutor(
        ToyStageExecutor(LayerRange(0, 2), MODEL), _info("head", 0, 2, 0.004), CONFIG
    )
    head.start()
    stage = StageNode(
        ToyStageExecutor(LayerRange(2, 4), MODEL),
        _info("s1", 2, 4, 0.0125),
        CONFIG,
        initial_peer=head.address,
    ).start()
    try:
        yield head, stage
    finally:
        stage.stop()
        head.close()


def _run_one_step(head: PipelineExecutor) -> None:
    tokens = (10, 11, 12, 13)
    head.submit(
        StepPlan(
            step_id=1,
            scheduled=(ScheduledSequence(5, 0, len(tokens), (0,), True),),
            token_ids=tokens,
            new_sequences=(NewSequenceData(5, tokens, len(tokens), SamplingParams()),),
        )
    )
    deadline = time.monotonic() + 10.0
    while not head.poll(0.1):
        assert time.monotonic() < deadline, "no result came back"


def _view(head: PipelineExecutor) -> dict[str, NodeInfo]:
    client = NodeClient(head.address, CONFIG)
    try:
        return {s.node_id: node_from_proto(s) for s in client.get_pipeline().stages}
    finally:
        client.close()


def test_layer_step_travels_in_node_records() -> None:
    info = _info("s1", 2, 4, 0.0125)
    assert node_from_proto(node_to_proto(info)).layer_step_s == 0.0125


def test_the_view_carries_each_nodes_speed(pipeline) -> None:
    head, stage = pipeline
    before = _view(head)
    assert {n: i.layer_step_s for n, i in before.items()} == {"head": 0.004, "s1": 0.0125}
    assert before["s1"].throughput_tokens_per_s == 0.0  # nothing computed yet
    _run_one_step(head)
    # The stage's rate reaches the head with its next health answer.
    deadline = time.monotonic() + 10.0
    while _view(head)["s1"].throughput_tokens_per_s == 0.0:
        assert time.monotonic() < deadline, "the stage's tokens/s never reached the view"
        time.sleep(0.1)
    view = _view(head)
    assert view["s1"].throughput_tokens_per_s == pytest.approx(
        stage.throughput_tokens_per_s, rel=0.5
    )
    assert view["head"].throughput_tokens_per_s > 0
    table = pipeline_status(head.address, CONFIG)
    header = next(line for line in table.splitlines() if line.startswith("NODE"))
    assert "LAYER STEP" in header and "TOKENS/S" in header
    assert "12.5 ms" in table and "4 ms" in table
