"""Mutual TLS between swarm members (head and stage as threads of this process): members
run a pipeline; an outsider, or a node with another swarm's key, has every call refused
at the handshake and changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest

from molink.config import LayerRange
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.toy import ToyStageExecutor, expected_token, toy_identity
from molink.sampling_params import SamplingParams
from molink.security.credentials import SwarmCredentials
from molink.security.swarm_key import SwarmKey, generate_swarm_key
from molink.step import NewSequenceData, ScheduledSequence, StepPlan
from molink.transport.channel import make_channel
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb
from molink.transport.generated import molink_pb2_grpc as pb_grpc
from tests.helpers.polling import first_result

MODEL = toy_identity(4)
KEY = generate_swarm_key()


def member_config(key: SwarmKey = KEY) -> TransportConfig:
    return TransportConfig(
        step_timeout_s=5.0, rpc_timeout_s=3.0, security=SwarmCredentials.from_key(key)
    )


def _info(config: TransportConfig, start: int, end: int) -> NodeInfo:
    assert config.security is not None
    return NodeInfo(config.security.node_id, MODEL, LayerRange(start, end), "127.0.0.1:0")


@pytest.fixture
def pipeline() -> Iterator[tuple[PipelineExecutor, StageNode]]:
    head_config, stage_config = member_config(), member_config()
    head = PipelineExecutor(
        ToyStageExecutor(LayerRange(0, 2), MODEL), _info(head_config, 0, 2), head_config
    ).start()
    stage = StageNode(
        ToyStageExecutor(LayerRange(2, 4), MODEL),
        _info(stage_config, 2, 4),
        stage_config,
        initial_peer=head.address,
    )
    try:
        stage.start()
        yield head, stage
    finally:
        stage.stop()
        head.close()


def _prefill(step_id: int, seq_id: int, tokens: tuple[int, ...]) -> StepPlan:
    return StepPlan(
        step_id=step_id,
        scheduled=(ScheduledSequence(seq_id, 0, len(tokens), (seq_id % 8,), True),),
        token_ids=tokens,
        new_sequences=(NewSequenceData(seq_id, tokens, len(tokens), SamplingParams()),),
    )


def test_members_run_a_pipeline_over_mutual_tls(pipeline) -> None:
    head, stage = pipeline
    assert head.readiness() is None
    head.submit(_prefill(1, 5, (10, 11, 12)))
    result = first_result(head)
    assert result.error is None
    assert result.sampled[0].token_id == expected_token(12, 5, 4)
    assert [s.node_id for s in head.pipeline().stages] == [head.head_id, stage.node_id]


def _every_call(
    head: PipelineExecutor, stage: StageNode
) -> dict[str, Callable[[pb_grpc.MolinkNodeStub], object]]:
    """Each RPC with a plausible request, as an outsider that learnt the ids would send it."""
    forward = pb.ForwardRequest(head_id=head.head_id, epoch=head.pipeline().epoch)
    forward.step.plan.step_id = 1
    results = pb.ReturnResultsRequest(head_id=head.head_id, sender_id=stage.node_id)
    results.result.sampled.add(seq_id=1, token_id=7)
    update = pb.Pipeline(head_id=head.head_id, epoch=10**6)
    join = pb.JoinRequest(node=pb.NodeInfo(node_id="intruder", address="127.0.0.1:1"))
    options = {"timeout": 3}
    return {
        "Describe": lambda s: s.Describe(pb.DescribeRequest(), **options),
        "GetPipeline": lambda s: s.GetPipeline(pb.GetPipelineRequest(), **options),
        "Join": lambda s: s.Join(join, **options),
        "UpdatePipeline": lambda s: s.UpdatePipeline(update, **options),
        "Forward": lambda s: list(s.Forward(iter([forward]), **options)),
        "ReturnResults": lambda s: list(s.ReturnResults(iter([results]), **options)),
        "Release": lambda s: s.Release(
            pb.ReleaseRequest(head_id=head.head_id, seq_ids=[1]), **options
        ),
        "Health": lambda s: s.Health(pb.HealthRequest(), **options),
        "Witness": lambda s: s.Witness(pb.WitnessRequest(head_id=head.head_id), **options),
    }


def _state(head: PipelineExecutor, stage: StageNode) -> tuple:
    view = head.pipeline()
    health = stage.health()
    return (
        view.epoch,
        tuple(s.node_id for s in view.stages),
        stage.current_view().epoch,
        health.steps_processed,
        health.steps_rejected,
        health.bytes_received,
        health.active_sequences,
    )


@pytest.mark.parametrize("outsider", ["plaintext", "other swarm key"])
def test_outsiders_fail_every_call_and_change_nothing(pipeline, outsider: str) -> None:
    head, stage = pipeline
    before = _state(head, stage)
    config = TransportConfig() if outsider == "plaintext" else member_config(generate_swarm_key())
    for node in (head.node, stage):
        channel = make_channel(node.address, config)
        stub = pb_grpc.MolinkNodeStub(channel)
        try:
            for name, call in _every_call(head, stage).items():
                with pytest.raises(grpc.RpcError) as caught:
                    call(stub)
                assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, name
        finally:
            channel.close()
    assert _state(head, stage) == before
    head.submit(_prefill(2, 6, (3,)))  # the members still serve
    assert first_result(head).error is None
