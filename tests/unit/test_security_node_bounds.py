"""Bounds on what a peer can make a node hold. Node-wide ones hold whatever identities
callers present: any member can mint fresh node ids (the swarm authority derives from the
shared key), each with its own per-peer allowance, so a per-peer bound alone does not
bound the node. A release names no more sequences than a head may hold, or than one
release chunk when that is more."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from molink.config import LayerRange
from molink.pipeline.toy import ToyStageExecutor
from molink.pipeline.worker import ComputeWorker, StepJob
from molink.placement.route import Route, RouteHop
from molink.transport.generated import molink_pb2 as pb
from molink.transport.validate import RELEASE_CHUNK_SEQUENCES
from tests.helpers.polling import first_result, wait_until
from tests.helpers.toy_swarm import MODEL as TOY_MODEL
from tests.helpers.toy_swarm import hidden, prefill
from tests.unit.test_security_authorization import (
    BASE,
    HOLD_S,
    Swarm,
    _forward,
    _prefill,
    _refused_stream,
    idle_until,
    member,
    running_swarm,
)

TOY_ROUTE = Route(
    (RouteHop("h", "x:1", 0, 1), RouteHop("s", "x:2", 1, 2), RouteHop("t", "x:3", 2, 4)), "x:1"
)


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    with running_swarm() as running:
        yield running


def test_streams_of_minted_identities_are_bounded_per_node(swarm: Swarm) -> None:
    release = threading.Event()
    streams = swarm.last.streams
    channels, calls = [], []
    try:
        # A fresh identity per stream, each well within its own allowance, one at a time
        # (counted by the node before the next), until the node is full.
        while streams.total() < BASE.max_streams_per_node:
            minted = member()
            channel, stub = swarm.stub(swarm.last.address, minted)
            channels.append(channel)
            calls.append(stub.Forward(idle_until(release), timeout=HOLD_S))
            node_id = minted.security.node_id
            assert wait_until(lambda node_id=node_id: streams.held(node_id) == 1)
        channel, stub = swarm.stub(swarm.last.address, member())
        channels.append(channel)
        refused = _refused_stream(stub)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already holds 6 streams of its peers" in refused.details()
        assert streams.total() == BASE.max_streams_per_node
    finally:
        release.set()
        for call in calls:
            list(call)
        for channel in channels:
            channel.close()
    assert wait_until(lambda: streams.total() <= 1)  # at most the route's own stream
    swarm.head.submit(_prefill(1, 5, (10,)))
    assert first_result(swarm.head).error is None


def test_a_release_names_at_most_as_many_sequences_as_a_head_may_hold(swarm: Swarm) -> None:
    swarm.head.submit(_prefill(1, 5, (10,)))
    assert first_result(swarm.head).error is None
    # A bound below a release chunk still lets a whole chunk go (heads send no more).
    limit = max(BASE.max_sequences_per_head, RELEASE_CHUNK_SEQUENCES)
    too_many = [5, *range(100, 100 + limit)]
    channel, stub = swarm.stub(swarm.last.address, swarm.head.config)
    with channel:
        with pytest.raises(grpc.RpcError) as caught:
            stub.Release(
                pb.ReleaseRequest(head_id=swarm.head.head_id, seq_ids=too_many), timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        named = f"seq_ids names {limit + 1} sequences, over the limit of {limit}"
        assert named in caught.value.details()
        in_band = _forward(swarm, 5, "release")
        in_band.release.seq_ids[:] = too_many
        (ack,) = stub.Forward(iter([in_band]), timeout=10)
        assert named in ack.error
        assert swarm.last.health().active_sequences == 1  # nothing was released
        enough = [5, *range(100, 100 + limit - 1)]
        stub.Release(pb.ReleaseRequest(head_id=swarm.head.head_id, seq_ids=enough), timeout=10)
    assert wait_until(lambda: swarm.last.health().active_sequences == 0)


def test_sequences_of_minted_heads_are_bounded_per_node() -> None:
    """Each fresh head id may hold max_sequences_per_head sequences on a stage; all heads
    together hold at most max_sequences_per_node."""
    errors: list[str] = []
    worker = ComputeWorker(
        ToyStageExecutor(LayerRange(1, 2), TOY_MODEL),
        "s",
        on_output=lambda out: None,
        on_error=lambda job, message, kind: errors.append(message),
        on_release=lambda job: None,
        max_queued=8,
        upstream_stall_s=60.0,
        max_sequences_per_head=2,
        max_sequences_per_node=3,
    )
    for head_id, seq_id in (("minted-1", 1), ("minted-1", 2), ("minted-2", 1)):
        plan = prefill(seq_id, seq_id)
        worker._steps([StepJob(head_id, TOY_ROUTE, plan, hidden(plan))])
    assert errors == [] and worker.active_sequences == 3
    plan = prefill(4, 4)
    worker._steps([StepJob("minted-3", TOY_ROUTE, plan, hidden(plan))])
    assert worker.active_sequences == 3
    (error,) = errors
    assert "all heads would hold 4 sequences" in error
    assert "at most 3 together (max_sequences_per_node)" in error


def test_a_results_trace_counts_only_when_it_names_the_steps_route(
    swarm: Swarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The last stage writes the whole trace it returns: one naming nodes off the step's
    route would make the head keep an estimate, and export metrics, for every id named."""
    executor = swarm.last._worker._executor
    computing, gate = threading.Event(), threading.Event()
    execute_many = executor.execute_many

    def held(*args, **kwargs):  # the step stays in flight until the forged result is in
        computing.set()
        gate.wait(30)
        return execute_many(*args, **kwargs)

    monkeypatch.setattr(executor, "execute_many", held)
    swarm.head.submit(_prefill(1, 5, (10,)))
    try:
        assert computing.wait(30)
        forged = pb.ReturnResultsRequest(head_id=swarm.head.head_id, sender_id=swarm.last.node_id)
        forged.result.step_id = 1
        forged.result.sampled.add(seq_id=5, token_id=7)
        for node_id in (swarm.head.head_id, "minted-1", "minted-2"):
            forged.result.trace.add(node_id=node_id, compute_s=100.0)
        channel, stub = swarm.stub(swarm.head.address, swarm.last.config)
        with channel:
            assert len(list(stub.ReturnResults(iter([forged]), timeout=10))) == 1
        result = first_result(swarm.head)
    finally:
        gate.set()
    assert result.sampled[0].token_id == 7  # the last stage may answer for the step
    assert result.stage_timings == {}
    assert not any("minted" in hop for hop in swarm.head.metrics().hops)
    assert not any("minted" in t.node_id for t in swarm.head.stage_timings())
    swarm.head.submit(_prefill(2, 6, (10,)))  # an honest trace names the route: kept
    honest = first_result(swarm.head)
    route = [swarm.head.head_id, swarm.middle.node_id, swarm.last.node_id]
    assert list(honest.stage_timings) == route
