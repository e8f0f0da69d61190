"""Detecting a lost node in one process: a frozen node (its socket accepts, nothing
answers) is evicted at its step deadline; a killed one when a step cannot reach it; both
reach the engine as a typed NodeFailure naming the sequences to replay."""

from __future__ import annotations

import dataclasses
import socket
import time
from collections.abc import Iterator

import pytest

from molink.config import LayerRange
from molink.dashboard.pipeline_provider import RecoveryCounters
from molink.pipeline import NodeInfo, PipelineExecutor, StageNode
from molink.pipeline.toy import ToyStageExecutor, toy_identity
from molink.pipeline.wire import node_to_proto
from molink.sampling_params import SamplingParams
from molink.step import FailureKind, NewSequenceData, ScheduledSequence, StepPlan, StepResult
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb

MODEL = toy_identity(4)
# The health monitor stays idle: only deadlines and failed steps detect here.
CONFIG = TransportConfig(
    step_timeout_s=30.0,
    health_interval_s=60.0,
    health_timeout_s=0.5,
    deadline_floor_s=0.3,
    lease_s=200.0,
    max_message_bytes=1 << 20,
)


def _info(node_id: str, start: int, end: int, address: str = "127.0.0.1:0") -> NodeInfo:
    return NodeInfo(node_id, MODEL, LayerRange(start, end), address)


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


def _prefill(step_id: int, seq_id: int) -> StepPlan:
    tokens = (1, 2, 3)
    return StepPlan(
        step_id=step_id,
        scheduled=(ScheduledSequence(seq_id, 0, len(tokens), (seq_id % 8,), True),),
        token_ids=tokens,
        new_sequences=(NewSequenceData(seq_id, tokens, len(tokens), SamplingParams()),),
    )


def _results(head: PipelineExecutor, count: int, timeout: float = 10.0) -> list[StepResult]:
    results: list[StepResult] = []
    deadline = time.monotonic() + timeout
    while len(results) < count:
        assert time.monotonic() < deadline, f"{len(results)} of {count} results came back"
        results += head.poll(0.1)
    return results


def _failures(head: PipelineExecutor, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while True:
        failures = head.take_failures()
        if failures:
            return failures
        assert time.monotonic() < deadline, "no failure was reported"
        time.sleep(0.05)


def test_a_frozen_node_is_evicted_at_its_deadline(head: PipelineExecutor) -> None:
    # Its stream is open and its steps are taken, but nothing comes back and its health
    # checks go unanswered: what a process stopped with SIGSTOP looks like.
    executor = ToyStageExecutor(LayerRange(2, 4), MODEL, delay_s=20.0)
    frozen = StageNode(executor, _info("z", 2, 4), CONFIG, initial_peer=head.address).start()
    frozen.health = lambda: time.sleep(5.0)  # type: ignore[method-assign]
    try:
        started = time.monotonic()
        head.submit(_prefill(1, 7))
        (result,) = _results(head, 1)
        assert result.failure_kind is FailureKind.DEADLINE and result.failed_node_id == "z"
        assert time.monotonic() - started < 3.0  # deadline 0.3 s, then a 0.5 s probe
        (failure,) = _failures(head)
        assert (failure.node_id, failure.kind, failure.seq_ids) == ("z", FailureKind.DEADLINE, (7,))
        assert head.failovers_total() == 1
        assert isinstance(head, RecoveryCounters)  # what the dashboard reads
        assert "layers [2, 4) are not served" in (head.readiness() or "")
    finally:
        executor.delay_s = 0.0
        frozen.stop()


def test_a_node_that_never_answers_a_connection_is_evicted(head: PipelineExecutor) -> None:
    with socket.socket() as silent:  # accepts connections, never speaks
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        response = head.handle_join(pb.JoinRequest(node=node_to_proto(_info("z", 2, 4, address))))
        assert response.accepted
        head.submit(_prefill(1, 7))
        (result,) = _results(head, 1, timeout=30.0)
        assert result.failure_kind in (FailureKind.DEADLINE, FailureKind.UNREACHABLE)
        (failure,) = _failures(head, timeout=30.0)
        assert failure.node_id == "z" and failure.seq_ids == (7,)


def test_a_killed_replica_is_evicted_and_the_other_takes_new_work(head: PipelineExecutor) -> None:
    config = dataclasses.replace(CONFIG)
    a = StageNode(ToyStageExecutor(LayerRange(2, 4), MODEL), _info("a", 2, 4), config,
                  initial_peer=head.address).start()  # fmt: skip
    b = StageNode(ToyStageExecutor(LayerRange(2, 4), MODEL), _info("b", 2, 4), config,
                  initial_peer=head.address).start()  # fmt: skip
    try:
        head.submit(_prefill(1, 1))
        (first,) = _results(head, 1)
        assert first.error is None
        victim = a if head.routes.route_of(1).contains("a") else b
        survivor = b if victim is a else a
        victim.stop()
        head.submit(_prefill(2, 1 + 100))  # a new sequence, routed while the victim looks alive
        results = _results(head, 1)
        if results[0].error is not None:  # it went to the victim: a typed failure
            assert results[0].failure_kind in (FailureKind.UNREACHABLE, FailureKind.DEADLINE)
        failures = _failures(head)
        assert failures[0].node_id == victim.node_id and 1 in failures[0].seq_ids
        assert head.pipeline().stage(victim.node_id) is None
        head.submit(_prefill(3, 200))
        (third,) = _results(head, 1)
        assert third.error is None and head.routes.route_of(200).contains(survivor.node_id)
        assert head.recovery_stats().failovers == 1
    finally:
        a.stop()
        b.stop()
