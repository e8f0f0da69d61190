"""Head and stages as threads of this process: errors, refusals, release, health."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator

import grpc
import pytest
import torch

from molink.config import LayerRange
from molink.errors import PipelineError
from molink.pipeline import JoinRefusedError, NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.status import pipeline_status
from molink.pipeline.toy import ToyStageExecutor, expected_token, toy_identity
from molink.pipeline.wire import route_to_proto
from molink.placement.route import Route, RouteHop
from molink.sampling_params import SamplingParams
from molink.step import FailureKind, NewSequenceData, ScheduledSequence, StepPlan, StepResult
from molink.transport.channel import method_path
from molink.transport.codec import encode_tensor
from molink.transport.config import TransportConfig
from molink.transport.convert import plan_to_proto
from molink.transport.generated import molink_pb2 as pb
from molink.transport.generated import molink_pb2_grpc as pb_grpc
from tests.helpers.polling import first_result

MODEL = toy_identity(4)
CONFIG = TransportConfig(
    step_timeout_s=3.0,
    health_interval_s=0.3,
    health_timeout_s=1.0,
    upstream_stall_s=0.5,
    max_message_bytes=1 << 20,
)


def _info(node_id: str, start: int, end: int, **kw: object) -> NodeInfo:
    return NodeInfo(node_id, kw.pop("model", MODEL), LayerRange(start, end), "127.0.0.1:0", **kw)


def _stage(
    head: PipelineExecutor,
    node_id: str,
    start: int,
    end: int,
    executor=None,
    config: TransportConfig = CONFIG,
    **kw: object,
) -> StageNode:
    executor = executor or ToyStageExecutor(LayerRange(start, end), MODEL)
    node = StageNode(executor, _info(node_id, start, end, **kw), config, initial_peer=head.address)
    return node.start()


@pytest.fixture
def head() -> Iterator[PipelineExecutor]:
    executor = PipelineExecutor(
        ToyStageExecutor(LayerRange(0, 2), MODEL), _info("head", 0, 2), CONFIG
    )
    executor.start()
    try:
        yield executor
    finally:
        executor.close()


@pytest.fixture
def stage(head: PipelineExecutor) -> Iterator[StageNode]:
    node = _stage(head, "s1", 2, 4)
    try:
        yield node
    finally:
        node.stop()


def _prefill(step_id: int, seq_id: int, tokens: tuple[int, ...], mb: int = 0) -> StepPlan:
    return StepPlan(
        step_id=step_id,
        scheduled=(ScheduledSequence(seq_id, 0, len(tokens), (seq_id % 8,), True),),
        token_ids=tokens,
        new_sequences=(NewSequenceData(seq_id, tokens, len(tokens), SamplingParams()),),
        micro_batch=mb,
    )


def _decode(step_id: int, seq_id: int, token: int, done: int, mb: int = 0) -> StepPlan:
    return StepPlan(
        step_id, (ScheduledSequence(seq_id, done, 1, (), True),), (token,), micro_batch=mb
    )


def _one(head: PipelineExecutor, timeout: float = 10.0) -> StepResult:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        results = head.poll(0.1)
        if results:
            assert len(results) == 1, results
            return results[0]
    raise AssertionError("no result came back")


def test_results_flow_and_bytes_are_counted(head: PipelineExecutor, stage: StageNode) -> None:
    assert head.readiness() is None
    head.submit(_prefill(1, 5, (10, 11, 12)))
    result = _one(head)
    assert result.error is None
    assert result.sampled[0].token_id == expected_token(12, 5, 4)
    assert set(result.stage_timings) == {"head", "s1"}
    metrics = head.metrics()
    assert set(metrics.hops) == {"head->s1", "s1->head"}
    assert metrics.sampled_tokens == 1 and metrics.bytes_per_token == metrics.bytes_on_wire > 0


def test_single_node_pipeline_runs_locally() -> None:
    local = PipelineExecutor(ToyStageExecutor(LayerRange(0, 4), MODEL), _info("solo", 0, 4), CONFIG)
    local.start()
    try:
        local.submit(_prefill(1, 2, (7,)))
        assert _one(local).sampled[0].token_id == expected_token(7, 2, 4)
    finally:
        local.close()


def test_submit_before_start_or_when_not_ready(head: PipelineExecutor) -> None:
    with pytest.raises(PipelineError, match="start"):
        PipelineExecutor(ToyStageExecutor(LayerRange(0, 2), MODEL), _info("x", 0, 2)).submit(
            _prefill(1, 1, (1,))
        )
    head.submit(_prefill(1, 1, (1,)))
    assert "layers [2, 4) are not served by any node" in _one(head).error


def test_unknown_sequence_is_reported_to_the_head(head: PipelineExecutor, stage: StageNode) -> None:
    head.submit(_decode(1, 42, 3, 10))
    error = _one(head).error
    assert "stage s1 rejected step 1" in error and "never received: 42" in error
    head.submit(_prefill(2, 42, (3,)))  # the stage keeps serving
    assert _one(head).error is None


class _Exploding(ToyStageExecutor):
    def execute(self, plan, hidden, head_id=""):
        if plan.step_id == 1:
            raise RuntimeError("kaboom")
        return super().execute(plan, hidden, head_id)


def test_executor_failure_names_the_stage(head: PipelineExecutor) -> None:
    node = _stage(head, "s1", 2, 4, executor=_Exploding(LayerRange(2, 4), MODEL))
    try:
        head.submit(_prefill(1, 1, (1,)))
        assert _one(head).error == "stage s1 failed on step 1 (micro-batch 0): RuntimeError: kaboom"
        head.submit(_prefill(2, 1, (1,)))
        assert _one(head).error is None
    finally:
        node.stop()


def _raw_forward(stage: StageNode, requests: list[pb.ForwardRequest]) -> list[pb.ForwardAck]:
    with grpc.insecure_channel(stage.address) as channel:
        acks = pb_grpc.MolinkNodeStub(channel).Forward(iter(requests), timeout=10)
        return list(acks)


def _request(
    head: PipelineExecutor, stage: StageNode, plan: StepPlan, hidden: pb.Tensor
) -> pb.ForwardRequest:
    request = pb.ForwardRequest(head_id=head.head_id, sender_id="rogue")
    route = Route(
        (RouteHop("head", head.address, 0, 2), RouteHop("s1", stage.address, 2, 4)), head.address
    )
    request.route.CopyFrom(route_to_proto(route))
    request.step.plan.CopyFrom(plan_to_proto(plan, include_token_ids=False))
    request.step.hidden.CopyFrom(hidden)
    return request


def _bare(head: PipelineExecutor, stage: StageNode) -> pb.ForwardRequest:
    """A request with a route but neither a step nor a release."""
    request = _request(head, stage, _prefill(1, 1, (1,)), pb.Tensor())
    request.ClearField("step")
    return request


def test_malformed_messages_are_rejected_and_the_stage_keeps_serving(
    head: PipelineExecutor, stage: StageNode
) -> None:
    plan = _prefill(7, 3, (1, 2))
    good = encode_tensor(torch.zeros(2, MODEL.hidden_size), "float16")
    bad_dtype = pb.Tensor(dtype=42, shape=good.shape, data=good.data)
    bad_shape = encode_tensor(torch.zeros(3, MODEL.hidden_size), "float16")
    short = pb.Tensor(dtype=good.dtype, shape=good.shape, data=good.data[:-2])
    elsewhere = _request(head, stage, plan, good)
    elsewhere.route.hops[1].node_id = "s7"
    stranger = _request(head, stage, plan, good)
    stranger.head_id = "nobody"
    bad_vocab = _request(head, stage, _prefill(7, 3, (1, 5000)), good)
    acks = _raw_forward(
        stage,
        [_request(head, stage, plan, t) for t in (bad_dtype, bad_shape, short)]
        + [elsewhere, stranger, bad_vocab, _bare(head, stage)],
    )
    errors = [ack.error for ack in acks]
    assert "wire dtype 42" in errors[0]
    assert "shape [3, 8], expected [2, 8]" in errors[1]
    assert "carries 30 bytes" in errors[2]
    assert "route head->s7 does not pass through stage s1" in errors[3]
    assert "does not start at head 'nobody'" in errors[4]
    assert "token id 5000 is outside the vocabulary" in errors[5]
    assert "neither a step nor a release" in errors[6]
    assert stage.health().steps_rejected == 7
    head.submit(_prefill(1, 1, (1,)))
    assert _one(head).error is None


def test_messages_over_the_size_limit_do_not_break_the_stage(
    head: PipelineExecutor, stage: StageNode
) -> None:
    huge = pb.Tensor(dtype=pb.WIRE_DTYPE_FLOAT32, shape=[1], data=b"\0" * (2 << 20))
    with pytest.raises(grpc.RpcError) as info:
        _raw_forward(stage, [_request(head, stage, _prefill(1, 1, (1,)), huge)])
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    head.submit(_prefill(1, 1, (1,)))
    assert _one(head).error is None


def test_unparsable_bytes_are_rejected(head: PipelineExecutor, stage: StageNode) -> None:
    with grpc.insecure_channel(stage.address) as channel:
        forward = channel.stream_stream(
            method_path("Forward"),
            request_serializer=None,
            response_deserializer=pb.ForwardAck.FromString,
        )
        acks = list(forward(iter([b"\xff\xff\xff garbage"]), timeout=10))
    assert "cannot parse" in acks[0].error
    head.submit(_prefill(1, 1, (1,)))
    assert _one(head).error is None


def test_join_refusal_is_raised_on_the_stage_and_logged_by_the_head(
    head: PipelineExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = toy_identity(4, served_name="other-model")
    node = StageNode(
        ToyStageExecutor(LayerRange(2, 4), wrong),
        _info("s9", 2, 4, model=wrong),
        CONFIG,
        initial_peer=head.address,
    )
    with caplog.at_level(logging.WARNING), pytest.raises(JoinRefusedError, match="model mismatch"):
        node.start()
    node.stop()
    assert any("refused node 's9': model mismatch" in r.getMessage() for r in caplog.records)


# For tests of joins and of the path of a step, not of failure detection: on a loaded
# machine a process running a head and its stages as threads can stall for seconds, and
# CONFIG's detectors (1 s health checks, 3 s step timeout, 2 s deadline with a 1 s probe)
# then drop a healthy stage or fail a healthy step.
STEADY = dataclasses.replace(
    CONFIG, step_timeout_s=60.0, health_interval_s=60.0, deadline_floor_s=60.0, lease_s=300.0
)


def test_joining_through_a_member_reaches_the_head() -> None:
    head = PipelineExecutor(ToyStageExecutor(LayerRange(0, 2), MODEL), _info("head", 0, 2), STEADY)
    head.start()
    try:
        first = _stage(head, "s1", 2, 3, config=STEADY)
        try:
            second = StageNode(
                ToyStageExecutor(LayerRange(3, 4), MODEL),
                _info("s2", 3, 4),
                STEADY,
                initial_peer=first.address,
            ).start()
            try:
                assert head.readiness() is None
                head.submit(_prefill(1, 1, (9,)))
                assert first_result(head).sampled[0].token_id == expected_token(9, 1, 4)
                table = pipeline_status(second.address, STEADY)
                assert "ready: every layer is served" in table
                for node_id in ("head", "s1", "s2"):
                    assert node_id in table
            finally:
                second.stop()
        finally:
            first.stop()
    finally:
        head.close()


def test_release_travels_in_band(head: PipelineExecutor, stage: StageNode) -> None:
    head.submit(_prefill(1, 1, (1,)))
    head.submit(_prefill(2, 2, (1,), mb=1))
    results: list[StepResult] = []
    deadline = time.monotonic() + 10
    while len(results) < 2 and time.monotonic() < deadline:  # together or one by one
        results += head.poll(0.1)
    assert {r.step_id for r in results} == {1, 2}
    assert stage.health().active_sequences == 2
    head.release([1])
    deadline = time.monotonic() + 5
    while stage.health().active_sequences != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stage.health().active_sequences == 1


def test_a_stalled_upstream_is_reported_in_health(head: PipelineExecutor, stage: StageNode) -> None:
    head.submit(_prefill(1, 1, (1,)))
    assert _one(head).error is None
    deadline = time.monotonic() + 5
    while stage.health().status != pb.HEALTH_STATUS_DEGRADED and time.monotonic() < deadline:
        time.sleep(0.1)
    health = stage.health()
    assert (
        "no input from upstream" in health.message and "1 sequence(s) are active" in health.message
    )


def test_a_step_without_result_fails_at_its_deadline() -> None:
    # Deadlines pass every 0.2 s; the stage answers every probe, so it stays in the
    # pipeline and the step fails only at its hard deadline, as DEADLINE.
    config = dataclasses.replace(CONFIG, step_timeout_s=0.8, deadline_floor_s=0.2)
    head = PipelineExecutor(ToyStageExecutor(LayerRange(0, 2), MODEL), _info("head", 0, 2), config)
    head.start()
    slow = _stage(head, "s1", 2, 4, executor=ToyStageExecutor(LayerRange(2, 4), MODEL, delay_s=3.0))
    try:
        started = time.monotonic()
        head.submit(_prefill(1, 1, (1,)))
        result = _one(head)
        assert "got no result within" in result.error and "on route head->s1" in result.error
        assert result.failure_kind is FailureKind.DEADLINE
        assert time.monotonic() - started < 2.5  # well before the 3 s the stage takes
        assert head.pipeline().stage("s1") is not None  # slow, not dead
        assert head.take_failures() == []
        # The late result is dropped: the step completes once.
        assert head.poll(3.0) == []
    finally:
        slow.stop()
        head.close()


def test_a_dead_stage_fails_steps_in_flight_and_shows_in_readiness(head: PipelineExecutor) -> None:
    slow = _stage(head, "s1", 2, 4, executor=ToyStageExecutor(LayerRange(2, 4), MODEL, delay_s=3.0))
    head.submit(_prefill(1, 1, (1,)))
    time.sleep(0.2)
    slow.stop()
    result = _one(head, timeout=5)
    assert "s1" in result.error
    deadline = time.monotonic() + 5
    while head.readiness() is None or "stopped answering" not in head.readiness():
        assert time.monotonic() < deadline, head.readiness()
        time.sleep(0.1)
    assert head.readiness().startswith("layers [2, 4) are not served by any node; stage s1")


def test_a_replacement_takes_the_layers_of_a_dead_stage_at_once() -> None:
    config = dataclasses.replace(CONFIG, health_interval_s=60.0)  # the monitor stays idle
    head = PipelineExecutor(ToyStageExecutor(LayerRange(0, 2), MODEL), _info("head", 0, 2), config)
    head.start()
    try:
        _stage(head, "s1", 2, 4, config=config).stop()
        replacement = _stage(head, "s1b", 2, 4, config=config)
        try:
            assert [s.node_id for s in head.pipeline().stages] == ["head", "s1b"]
            head.submit(_prefill(1, 1, (1,)))
            assert _one(head).error is None
        finally:
            replacement.stop()
    finally:
        head.close()


def test_a_replica_joins_beside_a_live_stage(head: PipelineExecutor, stage: StageNode) -> None:
    replica = _stage(head, "s1x", 2, 4)
    try:
        assert [s.node_id for s in head.pipeline().stages] == ["head", "s1", "s1x"]
        assert head.readiness() is None
        # A span that meets no boundary leaves every layer served but no route.
        odd = _stage(head, "s3", 3, 4)
        odd.stop()
    finally:
        replica.stop()
