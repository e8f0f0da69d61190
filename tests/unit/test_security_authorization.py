"""Every call is authorized by the caller's certificate identity (head and stages as
threads of this process, all members of one swarm): a member that is not a sequence's
head cannot step, release or deliver for it, nor rewrite another head's pipeline; a join
names its sender; streams, joins and sequences per peer are bounded."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from molink.config import LayerRange
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.authorization import check_result
from molink.pipeline.toy import ToyStageExecutor, expected_token, toy_identity
from molink.pipeline.wire import node_to_proto, route_to_proto
from molink.placement.route import Route, RouteHop
from molink.sampling_params import SamplingParams
from molink.security.credentials import SwarmCredentials
from molink.security.swarm_key import generate_swarm_key
from molink.step import NewSequenceData, ScheduledSequence, StepPlan
from molink.transport.channel import make_channel
from molink.transport.codec import encode_tensor
from molink.transport.config import TransportConfig
from molink.transport.convert import plan_to_proto
from molink.transport.generated import molink_pb2 as pb
from molink.transport.generated import molink_pb2_grpc as pb_grpc
from tests.helpers.polling import first_result, wait_until

MODEL = toy_identity(4)
KEY = generate_swarm_key()
BASE = TransportConfig(
    step_timeout_s=5.0,
    rpc_timeout_s=3.0,
    max_streams_per_peer=3,
    max_streams_per_node=6,
    join_burst=4,
    max_sequences_per_head=3,
)


def member() -> TransportConfig:
    return dataclasses.replace(BASE, security=SwarmCredentials.from_key(KEY))


def _info(config: TransportConfig, start: int, end: int) -> NodeInfo:
    assert config.security is not None
    return NodeInfo(config.security.node_id, MODEL, LayerRange(start, end), "127.0.0.1:0")


def _node(config: TransportConfig, start: int, end: int, peer: str, delay_s: float = 0.0):
    executor = ToyStageExecutor(LayerRange(start, end), MODEL, delay_s=delay_s)
    return StageNode(executor, _info(config, start, end), config, initial_peer=peer)


@dataclasses.dataclass
class Swarm:
    head: PipelineExecutor
    middle: StageNode  # layers [1, 2)
    last: StageNode  # layers [2, 4), slow enough to keep a step in flight
    rogue: TransportConfig  # a member of the swarm that is in no pipeline

    def stub(self, address: str, config: TransportConfig | None = None):
        channel = make_channel(address, config or self.rogue)
        return channel, pb_grpc.MolinkNodeStub(channel)


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    with running_swarm() as running:
        yield running


@contextlib.contextmanager
def running_swarm() -> Iterator[Swarm]:
    """A head and two stages, all members of one swarm, and a member in no pipeline."""
    head_config = member()
    head = PipelineExecutor(
        ToyStageExecutor(LayerRange(0, 1), MODEL), _info(head_config, 0, 1), head_config
    ).start()
    middle = _node(member(), 1, 2, head.address).start()
    # Joins through a member: in a swarm the member sends it on to the head.
    last = _node(member(), 2, 4, middle.address, delay_s=0.3).start()
    try:
        yield Swarm(head, middle, last, member())
    finally:
        last.stop()
        middle.stop()
        head.close()


def _prefill(step_id: int, seq_id: int, tokens: tuple[int, ...]) -> StepPlan:
    return StepPlan(
        step_id=step_id,
        scheduled=(ScheduledSequence(seq_id, 0, len(tokens), (seq_id % 8,), True),),
        token_ids=tokens,
        new_sequences=(NewSequenceData(seq_id, tokens, len(tokens), SamplingParams()),),
    )


def test_a_swarm_pipeline_runs_and_a_join_through_a_member_reaches_the_head(swarm) -> None:
    assert swarm.head.readiness() is None
    assert [s.node_id for s in swarm.head.pipeline().stages] == [
        swarm.head.head_id,
        swarm.middle.node_id,
        swarm.last.node_id,
    ]
    swarm.head.submit(_prefill(1, 5, (10, 11)))
    result = first_result(swarm.head)
    assert result.error is None and result.sampled[0].token_id == expected_token(11, 5, 4)


def test_only_the_head_releases_its_sequences(swarm) -> None:
    swarm.head.submit(_prefill(1, 5, (10,)))
    assert first_result(swarm.head).error is None
    assert swarm.last.health().active_sequences == 1
    for config in (swarm.rogue, swarm.middle.config):
        channel, stub = swarm.stub(swarm.last.address, config)
        with channel, pytest.raises(grpc.RpcError) as caught:
            stub.Release(pb.ReleaseRequest(head_id=swarm.head.head_id, seq_ids=[5]), timeout=3)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only head" in caught.value.details()
    time.sleep(0.3)
    assert swarm.last.health().active_sequences == 1
    swarm.head.release([5])  # the head itself may
    assert wait_until(lambda: swarm.last.health().active_sequences == 0)


def test_only_the_head_learns_what_its_steps_carried(swarm) -> None:
    """Spot checks ask the node after a checked one what it received (the last row of
    each sequence it declared checked); nobody else may ask."""
    swarm.head.submit(dataclasses.replace(_prefill(1, 5, (10, 11)), witness_seq_ids=(5,)))
    assert first_result(swarm.head).error is None
    request = pb.WitnessRequest(head_id=swarm.head.head_id)
    request.queries.add(step_id=1, micro_batch=0, seq_ids=[5])
    for config in (swarm.rogue, swarm.middle.config):
        channel, stub = swarm.stub(swarm.last.address, config)
        with channel, pytest.raises(grpc.RpcError) as caught:
            stub.Witness(request, timeout=3)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only head" in caught.value.details()
    channel, stub = swarm.stub(swarm.last.address, swarm.head.config)
    with channel:
        (answer,) = stub.Witness(request, timeout=3).answers
    assert not answer.missing and list(answer.rows.shape) == [1, MODEL.hidden_size]
    many = pb.WitnessRequest(head_id=swarm.head.head_id)
    for _ in range(17):
        many.queries.add(step_id=1, seq_ids=[5])
    channel, stub = swarm.stub(swarm.last.address, swarm.head.config)
    with channel, pytest.raises(grpc.RpcError) as caught:
        stub.Witness(many, timeout=3)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "queries: 17" in caught.value.details()


def _forward(swarm: Swarm, seq_id: int, kind: str) -> pb.ForwardRequest:
    request = pb.ForwardRequest(head_id=swarm.head.head_id, sender_id="x")
    request.route.CopyFrom(route_to_proto(swarm.head.routes.route_for_new(2)))
    if kind == "release":
        request.release.CopyFrom(pb.ReleaseRequest(head_id=swarm.head.head_id, seq_ids=[seq_id]))
        return request
    plan = _prefill(9, seq_id, (1, 2))
    request.step.plan.CopyFrom(plan_to_proto(plan, include_token_ids=False))
    request.step.hidden.CopyFrom(encode_tensor(torch.zeros(2, MODEL.hidden_size), "float32"))
    return request


def test_a_member_off_the_route_cannot_step_or_release_another_heads_sequences(swarm) -> None:
    swarm.head.submit(_prefill(1, 5, (10,)))
    assert first_result(swarm.head).error is None
    before = swarm.last.health()
    channel, stub = swarm.stub(swarm.last.address)
    with channel:
        acks = list(
            stub.Forward(
                iter([_forward(swarm, 6, "step"), _forward(swarm, 5, "release")]), timeout=5
            )
        )
    assert all("refused a forward message" in ack.error for ack in acks)
    assert "reach node" in acks[0].error and "not from node" in acks[0].error
    time.sleep(0.5)
    after = swarm.last.health()
    assert after.active_sequences == before.active_sequences == 1
    assert after.steps_processed == before.steps_processed
    assert after.steps_rejected == before.steps_rejected + 2
    swarm.head.submit(_prefill(2, 7, (3,)))  # the head's own traffic still flows
    assert first_result(swarm.head).sampled[0].token_id == expected_token(3, 7, 4)


def test_the_head_takes_results_only_from_its_last_stage(swarm) -> None:
    swarm.head.submit(_prefill(1, 5, (10,)))  # in flight for 0.3 s on the slow last stage
    forged = pb.ReturnResultsRequest(head_id=swarm.head.head_id, sender_id=swarm.last.node_id)
    forged.result.step_id = 1
    forged.result.sampled.add(seq_id=5, token_id=999)
    failure = pb.ReturnResultsRequest(head_id=swarm.head.head_id, sender_id=swarm.last.node_id)
    failure.result.step_id = 1
    failure.result.error = "forged failure"
    for config in (swarm.rogue, swarm.middle.config):
        channel, stub = swarm.stub(swarm.head.address, config)
        messages = [forged] if config is swarm.middle.config else [forged, failure]
        with channel:
            assert len(list(stub.ReturnResults(iter(messages), timeout=5))) == len(messages)
    result = first_result(swarm.head)
    assert result.error is None
    assert result.sampled[0].token_id == expected_token(10, 5, 4) != 999


def test_only_the_head_updates_its_pipeline(swarm) -> None:
    view = swarm.last.current_view()
    update = pb.Pipeline(head_id=swarm.head.head_id, epoch=view.epoch + 100)
    for config in (swarm.rogue, swarm.middle.config):
        channel, stub = swarm.stub(swarm.last.address, config)
        with channel, pytest.raises(grpc.RpcError) as caught:
            stub.UpdatePipeline(update, timeout=3)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert swarm.last.current_view() == view


def test_a_join_names_its_sender_and_joins_are_rate_limited(swarm) -> None:
    channel, stub = swarm.stub(swarm.head.address)
    epoch = swarm.head.pipeline().epoch
    with channel:
        impostor = node_to_proto(_info(swarm.last.config, 2, 4).with_address("127.0.0.1:9"))
        response = stub.Join(pb.JoinRequest(node=impostor), timeout=3)
        assert not response.accepted and "joins under its own id" in response.reason
        itself = node_to_proto(_info(swarm.rogue, 2, 9).with_address("127.0.0.1:9"))
        reasons = [stub.Join(pb.JoinRequest(node=itself), timeout=3).reason for _ in range(6)]
    assert "not a non-empty part" in reasons[0]  # refused on its merits: no such layers
    assert any("too many joins from node" in reason for reason in reasons)
    assert swarm.head.pipeline().epoch == epoch


def _refused_stream(stub, timeout: float = 45.0) -> grpc.RpcError:
    """One more stream, refused (on a loaded machine a try can run out of time in its TLS
    handshake: that is no answer, so it tries again)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            list(stub.Forward(iter([]), timeout=10))
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                return error
            continue
        raise AssertionError("the stream beyond the bound was taken")
    raise AssertionError("the stream beyond the bound got no answer")


HOLD_S = 90.0


def idle_until(release: threading.Event) -> Iterator[pb.ForwardRequest]:
    """A stream's requests: none, until ``release`` is set (bounded by HOLD_S), longer
    than a refusal may take to arrive on a loaded machine."""
    release.wait(HOLD_S)
    return
    yield


def test_streams_per_member_are_bounded(swarm) -> None:
    release = threading.Event()
    rogue_id = swarm.rogue.security.node_id
    channel, stub = swarm.stub(swarm.last.address)
    calls = []
    try:
        # One at a time, each counted by the node before the next: streams opened together
        # reach the node in any order, and the extra one could take a held one's place.
        for held in range(1, BASE.max_streams_per_peer + 1):
            calls.append(stub.Forward(idle_until(release), timeout=HOLD_S))
            assert wait_until(lambda held=held: swarm.last.streams.held(rogue_id) == held)
        refused = _refused_stream(stub)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already holds 3 streams" in refused.details()
    finally:
        release.set()
        for call in calls:
            list(call)
        channel.close()
    swarm.head.submit(_prefill(1, 5, (10,)))  # the route's own streams were never refused
    assert first_result(swarm.head).error is None


def test_sequences_one_head_holds_on_a_stage_are_bounded(swarm) -> None:
    for seq_id in range(BASE.max_sequences_per_head):
        swarm.head.submit(_prefill(seq_id + 1, seq_id, (4,)))
        assert first_result(swarm.head).error is None
    swarm.head.submit(_prefill(10, 10, (4,)))
    assert "one head may hold at most 3" in first_result(swarm.head).error
    swarm.head.release([0])
    assert wait_until(lambda: swarm.middle.health().active_sequences == 2)
    swarm.head.submit(_prefill(11, 10, (4,)))
    assert first_result(swarm.head).error is None


def _keyless_identity_channel(address: str) -> grpc.Channel:
    """A channel with a certificate of the swarm's authority over an RSA key: any member
    can issue one (the authority derives from the shared key), and it names no node id,
    which is only ever an EC key's hash."""
    authority = SwarmCredentials.from_key(KEY).authority
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    certificate = authority.issue(key.public_key(), "no-node-id")  # type: ignore[arg-type]
    credentials = grpc.ssl_channel_credentials(
        root_certificates=authority.certificate_pem(),
        private_key=key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
        certificate_chain=certificate.public_bytes(serialization.Encoding.PEM),
    )
    return grpc.secure_channel(address, credentials, options=SwarmCredentials.channel_options())


def test_a_certificate_that_names_no_node_is_refused_not_trusted_as_open_mode(swarm) -> None:
    swarm.head.submit(_prefill(1, 5, (10,)))
    assert first_result(swarm.head).error is None
    view = swarm.last.current_view()
    channel = _keyless_identity_channel(swarm.last.address)
    stub = pb_grpc.MolinkNodeStub(channel)
    calls = {
        "Release": lambda: stub.Release(
            pb.ReleaseRequest(head_id=swarm.head.head_id, seq_ids=[5]), timeout=3
        ),
        "UpdatePipeline": lambda: stub.UpdatePipeline(
            pb.Pipeline(head_id=swarm.head.head_id, epoch=view.epoch + 100), timeout=3
        ),
        "Forward": lambda: list(stub.Forward(iter([_forward(swarm, 5, "release")]), timeout=3)),
    }
    with channel:
        for name, call in calls.items():
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert "no node id" in caught.value.details(), name
    assert swarm.last.current_view() == view
    assert swarm.last.health().active_sequences == 1


def test_an_error_report_blames_only_its_sender_or_the_hop_after_it() -> None:
    """The head steers new sequences away from the node a KV_FULL or UNREACHABLE report
    names: a node of the route may name itself (no room) or the hop after it (could not
    deliver), not any other member."""
    route = Route(
        (RouteHop("h", "a0", 0, 1), RouteHop("m", "a1", 1, 2), RouteHop("l", "a2", 2, 4)), "a0"
    )

    def report(kind: int, blamed: str) -> pb.ReturnResultsRequest:
        request = pb.ReturnResultsRequest(head_id="h")
        request.result.step_id = 1
        request.result.error = "failed"
        request.result.failure_kind = kind
        request.result.failed_node_id = blamed
        return request

    assert check_result("m", report(pb.FAILURE_KIND_KV_FULL, "m"), route) is None
    assert check_result("m", report(pb.FAILURE_KIND_UNREACHABLE, "l"), route) is None
    assert check_result("l", report(pb.FAILURE_KIND_UNREACHABLE, ""), route) is None
    assert check_result("l", report(pb.FAILURE_KIND_NODE_ERROR, "l"), route) is None
    assert "blames node l" in check_result("m", report(pb.FAILURE_KIND_KV_FULL, "l"), route)
    assert "blames node m" in check_result("l", report(pb.FAILURE_KIND_UNREACHABLE, "m"), route)
    assert check_result("m", report(pb.FAILURE_KIND_UNREACHABLE, "x"), route) is not None
