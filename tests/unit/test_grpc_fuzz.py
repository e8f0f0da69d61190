"""The gRPC surface under random and malformed input (hypothesis), sent by swarm members
entitled to each call, so that messages get past authorization into decoding and
validation: random bytes to every method, steps with lying shapes, dtypes and sizes,
random plans, results, joins, updates and releases. No call may crash a handler (gRPC
answers UNKNOWN for an exception that escapes one) or hang; afterwards the pipeline
still computes the right tokens."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from molink.config import LayerRange
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.toy import ToyStageExecutor, expected_token, toy_identity
from molink.sampling_params import SamplingParams
from molink.security.credentials import SwarmCredentials
from molink.security.swarm_key import generate_swarm_key
from molink.step import NewSequenceData, ScheduledSequence, StepPlan, StepResult
from molink.transport.channel import SERVICE, make_channel, method_path
from molink.transport.config import MIB, TransportConfig
from molink.transport.generated import molink_pb2 as pb
from molink.transport.generated import molink_pb2_grpc as pb_grpc

MODEL = toy_identity(4)
KEY = generate_swarm_key()
BASE = TransportConfig(
    step_timeout_s=5.0,
    rpc_timeout_s=3.0,
    max_message_bytes=4 * MIB,
    upstream_stall_s=60.0,
    join_burst=1_000_000,
    node_join_burst=1_000_000,
)
CALL_TIMEOUT_S = 10.0  # a call still running after this is a hang
# Codes a handler or gRPC itself may answer with; UNKNOWN (an escaped exception) and
# DEADLINE_EXCEEDED (a hang) are failures.
ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.INTERNAL,  # gRPC's own "Exception deserializing request"
}
FUZZ = settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
small = st.integers(0, 40)
text = st.text(max_size=40)


def member() -> TransportConfig:
    return dataclasses.replace(BASE, security=SwarmCredentials.from_key(KEY))


def _info(config: TransportConfig, start: int, end: int) -> NodeInfo:
    assert config.security is not None
    return NodeInfo(config.security.node_id, MODEL, LayerRange(start, end), "127.0.0.1:0")


@dataclasses.dataclass
class Target:
    head: PipelineExecutor
    stage: StageNode
    rogue: TransportConfig
    channels: dict[str, grpc.Channel]

    def stub(self, as_whom: str, to: str) -> pb_grpc.MolinkNodeStub:
        return pb_grpc.MolinkNodeStub(self.channel(as_whom, to))

    def channel(self, as_whom: str, to: str) -> grpc.Channel:
        key = f"{as_whom}->{to}"
        if key not in self.channels:
            config = {
                "head": self.head.config,
                "stage": self.stage.config,
                "rogue": self.rogue,
            }[as_whom]
            address = self.head.address if to == "head" else self.stage.address
            self.channels[key] = make_channel(address, config)
        return self.channels[key]


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    head_config, stage_config = member(), member()
    head = PipelineExecutor(
        ToyStageExecutor(LayerRange(0, 2), MODEL), _info(head_config, 0, 2), head_config
    ).start()
    stage = StageNode(
        ToyStageExecutor(LayerRange(2, 4), MODEL),
        _info(stage_config, 2, 4),
        stage_config,
        initial_peer=head.address,
    ).start()
    fuzzed = Target(head, stage, member(), {})
    try:
        yield fuzzed
        _assert_still_serving(fuzzed)
    finally:
        for channel in fuzzed.channels.values():
            channel.close()
        stage.stop()
        head.close()


def _assert_still_serving(target: Target) -> None:
    plan = StepPlan(
        step_id=10**9,
        scheduled=(ScheduledSequence(10**6, 0, 2, (0,), True),),
        token_ids=(5, 6),
        new_sequences=(NewSequenceData(10**6, (5, 6), 2, SamplingParams()),),
    )
    target.head.submit(plan)
    deadline = time.monotonic() + 10
    results: list[StepResult] = []
    while not results and time.monotonic() < deadline:
        results = target.head.poll(0.1)
    assert results and results[0].error is None, results
    assert results[0].sampled[0].token_id == expected_token(6, 10**6, 4)
    for address in (target.head.address, target.stage.address):
        channel = make_channel(address, target.rogue)
        with channel:
            health = pb_grpc.MolinkNodeStub(channel).Health(pb.HealthRequest(), timeout=5)
        assert health.status in (pb.HEALTH_STATUS_SERVING, pb.HEALTH_STATUS_DEGRADED)


def _call(run) -> None:
    """Runs one call; it may succeed or fail cleanly, not crash a handler or hang."""
    try:
        run()
    except grpc.RpcError as exc:
        assert exc.code() in ALLOWED, f"{exc.code()}: {exc.details()}"


# -- strategies ---------------------------------------------------------------------------

sampling = st.builds(
    pb.SamplingParams,
    n=small,
    temperature=st.floats(allow_nan=True, allow_infinity=True),
    top_p=st.floats(allow_nan=True, allow_infinity=True),
    top_k=st.integers(-(2**31), 2**31 - 1),
    repetition_penalty=st.floats(allow_nan=True, allow_infinity=True),
    seed=st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
    stop=st.lists(text, max_size=5),
    stop_token_ids=st.lists(u32, max_size=5),
    max_tokens=st.one_of(st.none(), u32),
    logprobs=st.one_of(st.none(), u32),
)
new_sequence = st.builds(
    pb.NewSequence,
    seq_id=st.one_of(small, u64),
    token_ids=st.lists(st.one_of(st.integers(0, 1200), u32), max_size=20),
    num_prompt_tokens=st.one_of(small, u32),
    sampling=sampling,
)
scheduled = st.builds(
    pb.ScheduledSequence,
    seq_id=st.one_of(small, u64),
    num_computed_tokens=st.one_of(small, u32),
    num_new_tokens=st.one_of(small, u32),
    new_block_ids=st.lists(st.one_of(small, u32), max_size=6),
    sample=st.booleans(),
)
plan = st.builds(
    pb.StepPlan,
    step_id=u64,
    scheduled=st.lists(scheduled, max_size=4),
    new_sequences=st.lists(new_sequence, max_size=3),
    finished_seq_ids=st.lists(st.one_of(small, u64), max_size=3),
    micro_batch=st.one_of(small, u32),
)
tensor = st.builds(
    pb.Tensor,
    dtype=st.integers(0, 8),
    shape=st.lists(st.one_of(st.integers(0, 64), u64), max_size=4),
    data=st.one_of(st.binary(max_size=2048), st.integers(0, 6 * MIB).map(lambda n: b"\1" * n)),
    scale=st.binary(max_size=64),
    outliers_per_row=st.one_of(small, u32),
    outlier_columns=st.binary(max_size=32),
    outlier_values=st.binary(max_size=32),
)


# -- the tests ----------------------------------------------------------------------------


@FUZZ
@given(method=st.sampled_from([m.name for m in SERVICE.methods]), raw=st.binary(max_size=512))
def test_random_bytes_to_every_method(target: Target, method: str, raw: bytes) -> None:
    descriptor = SERVICE.methods_by_name[method]
    channel = target.channel("head", "stage")
    path = method_path(method)
    if descriptor.client_streaming:
        call = channel.stream_stream(path, request_serializer=None, response_deserializer=None)
        _call(lambda: list(call(iter([raw, raw]), timeout=CALL_TIMEOUT_S)))
    else:
        unary = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        _call(lambda: unary(raw, timeout=CALL_TIMEOUT_S))


@FUZZ
@given(
    steps=st.lists(st.tuples(plan, tensor, st.booleans(), st.booleans()), min_size=1, max_size=3),
    release=st.lists(st.one_of(small, u64), max_size=4),
)
def test_random_steps_from_the_head(target: Target, steps, release) -> None:
    """As the head itself, with its head id and epoch (or a wrong one): the deepest path."""
    view = target.stage.current_view()
    messages = []
    for step_plan, hidden, right_head, right_epoch in steps:
        request = pb.ForwardRequest(
            head_id=target.head.head_id if right_head else "someone",
            epoch=view.epoch if right_epoch else view.epoch + 1,
        )
        request.step.plan.CopyFrom(step_plan)
        request.step.hidden.CopyFrom(hidden)
        messages.append(request)
    released = pb.ForwardRequest(head_id=target.head.head_id, epoch=view.epoch)
    released.release.seq_ids.extend(release)
    messages.append(released)
    stub = target.stub("head", "stage")
    _call(lambda: list(stub.Forward(iter(messages), timeout=CALL_TIMEOUT_S)))
    _call(
        lambda: stub.Release(
            pb.ReleaseRequest(head_id=target.head.head_id, seq_ids=release),
            timeout=CALL_TIMEOUT_S,
        )
    )


@FUZZ
@given(
    results=st.lists(
        st.builds(
            pb.StepResult,
            step_id=st.one_of(small, u64),
            sampled=st.lists(st.builds(pb.SampledToken, seq_id=u64, token_id=u32), max_size=4),
            micro_batch=st.one_of(small, u32),
            error=st.one_of(st.none(), text),
        ),
        max_size=4,
    ),
    as_whom=st.sampled_from(["stage", "rogue"]),
)
def test_random_results_to_the_head(target: Target, results, as_whom: str) -> None:
    messages = [
        pb.ReturnResultsRequest(head_id=target.head.head_id, sender_id="x", result=result)
        for result in results
    ]
    stub = target.stub(as_whom, "head")
    _call(lambda: list(stub.ReturnResults(iter(messages), timeout=CALL_TIMEOUT_S)))


node_info = st.builds(
    pb.NodeInfo,
    node_id=text,
    model=st.builds(
        pb.ModelIdentity,
        served_name=text,
        fingerprint=st.sampled_from([MODEL.fingerprint, "other"]),
        num_layers=st.sampled_from([4, 0, 2**32 - 1]),
        hidden_size=st.sampled_from([MODEL.hidden_size, 0, 2**32 - 1]),
        vocab_size=st.sampled_from([MODEL.vocab_size, 0]),
    ),
    layers=st.builds(pb.LayerSpan, start=st.one_of(small, u32), end=st.one_of(small, u32)),
    num_kv_blocks=u32,
    block_size=u32,
    dtype=text,
    wire_dtype=st.sampled_from(["float16", "float32", "int8", "", "complex"]),
    protocol_version=st.one_of(small, u32),
    address=text,
)


@FUZZ
@given(info=node_info, own_id=st.booleans(), stages=st.lists(node_info, max_size=3), epoch=u64)
def test_random_joins_and_updates(target: Target, info, own_id: bool, stages, epoch) -> None:
    """As a member in no pipeline: a join under its own id reaches the head's checks; an
    update of another head's pipeline is refused."""
    if own_id:
        info.node_id = target.rogue.security.node_id
    stub = target.stub("rogue", "head")
    epoch_before = target.head.pipeline().epoch
    _call(lambda: stub.Join(pb.JoinRequest(node=info), timeout=CALL_TIMEOUT_S))
    update = pb.Pipeline(head_id=target.head.head_id, epoch=epoch, stages=stages)
    stage_stub = target.stub("rogue", "stage")
    _call(lambda: stage_stub.UpdatePipeline(update, timeout=CALL_TIMEOUT_S))
    assert target.head.pipeline().epoch == epoch_before
