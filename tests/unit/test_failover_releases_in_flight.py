"""A step carries the releases of its route's finished sequences (``finished_seq_ids``),
and the head forgets those sequences' routes when it sends the step. When a node of that
route is lost while the step is out, the nodes after it never see the step: the head's
failover must free those sequences there too, or they keep their KV for as long as the
head renews its lease."""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator

import grpc
import pytest

from molink.pipeline.head_flights import error_result
from molink.pipeline.toy import ToyStageExecutor
from molink.pipeline.worker import StepJob
from molink.step import FailureKind
from molink.transport.channel import NodeClient
from tests.helpers.polling import first_result, results_of, wait_until
from tests.helpers.toy_swarm import (
    CONFIG,
    REPLICAS_BEFORE_N,
    ToySwarm,
    decode,
    prefill,
    toy_swarm,
)


@pytest.fixture
def chain() -> Iterator[ToySwarm]:
    """head [0, 1) -> a [1, 2) -> n [2, 4)."""
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        yield swarm


def _hold_step(
    executor: ToyStageExecutor,
    step_id: int,
    gate: threading.Event,
    monkeypatch,
    hold_s: float = 30.0,
):
    original = executor.execute
    reached = threading.Event()

    def held_execute(plan, hidden, head_id=""):
        if plan.step_id == step_id:
            reached.set()
            gate.wait(hold_s)
        return original(plan, hidden, head_id)

    monkeypatch.setattr(executor, "execute", held_execute)
    return reached


def test_a_lost_node_frees_after_it_the_sequences_its_failed_step_was_releasing(
    chain: ToySwarm, monkeypatch
) -> None:
    head, last = chain.head, chain.executors["n"]
    head.submit(prefill(0, 7))
    assert first_result(head).error is None
    head.submit(prefill(1, 8))
    token = first_result(head).sampled[0].token_id
    assert ("h", 7) in last.sequences and ("h", 8) in last.sequences
    gate = threading.Event()
    try:
        reached = _hold_step(chain.executors["a"], 2, gate, monkeypatch)
        # Sequence 7 finished: 8's next step frees it along the route, and a holds it.
        head.submit(decode(2, 8, token, finished=(7,)))
        assert reached.wait(30.0)
        assert head.evict_node("a", "taken out by the test")
        assert first_result(head).error is not None
        assert wait_until(lambda: ("h", 8) not in last.sequences)  # it was on a's route
        # 7 was released by the step a held: n must free it too (it kept it for good).
        assert wait_until(lambda: ("h", 7) not in last.sequences, timeout=10.0)
    finally:
        gate.set()


def test_a_step_whose_node_is_lost_as_it_leaves_frees_what_it_carried(
    chain: ToySwarm, monkeypatch
) -> None:
    """The node is evicted after the step's releases were taken from the route book and
    before the step is on record: the step fails at once, never sent, and its releases
    must still reach the route's other nodes."""
    head, last = chain.head, chain.executors["n"]
    head.submit(prefill(0, 7))
    assert first_result(head).error is None
    head.submit(prefill(1, 8))
    token = first_result(head).sampled[0].token_id
    desk = head._failover
    noted = desk.note_submitted

    def lost_as_it_leaves(step_id: int) -> None:
        if step_id == 2:
            assert head.evict_node("a", "taken out by the test")
        noted(step_id)

    monkeypatch.setattr(desk, "note_submitted", lost_as_it_leaves)
    head.submit(decode(2, 8, token, finished=(7,)))
    failed = first_result(head)
    assert failed.step_id == 2 and failed.error is not None
    assert "is gone" in failed.error  # it never left
    assert wait_until(lambda: ("h", 8) not in last.sequences)  # it was on a's route
    assert wait_until(lambda: ("h", 7) not in last.sequences, timeout=10.0)


def test_a_step_no_route_takes_still_frees_what_it_carried(monkeypatch) -> None:
    """Both replicas of [1, 2) are suspected (no new sequence goes through either) when a
    step with a new sequence comes, carrying the release of a sequence on a's or b's
    route: no route takes the step, so it fails at the head, and the release it carried
    must still go out along the finished sequence's own route."""
    with toy_swarm(REPLICAS_BEFORE_N) as swarm:
        head, last = swarm.head, swarm.executors["n"]
        head.submit(prefill(0, 7))
        assert first_result(head).error is None
        assert ("h", 7) in last.sequences
        head.routes.avoid("a", 60.0)
        head.routes.avoid("b", 60.0)
        head.submit(prefill(1, 8, finished=(7,)))
        refused = first_result(head)
        assert refused.error is not None and "no route" in refused.error
        assert wait_until(lambda: ("h", 7) not in last.sequences, timeout=10.0)
        assert head.routes.route_of(7) is None


def test_a_release_call_that_fails_once_is_made_again(chain: ToySwarm, monkeypatch) -> None:
    """The call that frees a lost node's sequences on the nodes after it fails once (a
    timeout on a busy node): those nodes still hear from the head, so their lease never
    frees the sequences; the head calls again."""
    head, last = chain.head, chain.executors["n"]
    head.submit(prefill(0, 7))
    assert first_result(head).error is None
    calls: list[str] = []
    release = NodeClient.release

    def failing_once(self, *args, **kwargs):
        calls.append(self.address)
        if len(calls) == 1:
            raise grpc.RpcError("deadline exceeded")
        return release(self, *args, **kwargs)

    monkeypatch.setattr(NodeClient, "release", failing_once)
    # Nothing passes through a (lost) to n in band: the call alone frees it there.
    monkeypatch.setattr(head._failover, "_submit", lambda job: None)
    assert head.evict_node("a", "taken out by the test")
    assert wait_until(lambda: ("h", 7) not in last.sequences, timeout=10.0)
    assert len(calls) == 2


def test_a_step_that_fails_on_its_way_frees_what_it_carried(chain: ToySwarm, monkeypatch) -> None:
    """A step carrying a release fails on its way without any node being evicted: here
    the head's stream to a breaks after a took it (a keeps running, and answers the probe
    that follows). The nodes it did not reach must still free what it carried."""
    head, last = chain.head, chain.executors["n"]
    head.submit(prefill(0, 7))
    assert first_result(head).error is None
    head.submit(prefill(1, 8))
    token = first_result(head).sampled[0].token_id
    gate = threading.Event()
    try:
        reached = _hold_step(chain.executors["a"], 2, gate, monkeypatch)
        head.submit(decode(2, 8, token, finished=(7,)))
        assert reached.wait(30.0)
        broken = error_result((2, 0), "stream to a broke", FailureKind.UNREACHABLE, "a")
        head.deliver_result(broken, [], "h", 0)
        assert first_result(head).error == "stream to a broke"
        assert wait_until(lambda: ("h", 7) not in last.sequences, timeout=10.0)
        assert head.pipeline().stage("a") is not None  # nothing was evicted
    finally:
        gate.set()


def test_a_step_the_heads_full_queue_refuses_still_frees_what_it_carried(monkeypatch) -> None:
    """The head's own stage is busy and its queue full when a step carrying the release
    of sequence 7 comes: the queue refuses the step, which never leaves the head, and the
    release it carried must still reach the route's nodes (the head's stage included,
    once it has room) instead of being dropped with it."""
    config = dataclasses.replace(CONFIG, max_queued_steps=2)
    with toy_swarm((("a", 1, 2), ("n", 2, 4)), config) as swarm:
        head, last = swarm.head, swarm.executors["n"]
        own: ToyStageExecutor = head.node._worker._executor
        head.submit(prefill(0, 7))
        assert first_result(head).error is None
        assert ("h", 7) in own.sequences and ("h", 7) in last.sequences
        gate = threading.Event()
        try:
            reached = _hold_step(own, 1, gate, monkeypatch, hold_s=60.0)
            head.submit(prefill(1, 8))
            assert reached.wait(30.0)
            head.submit(prefill(2, 9))
            head.submit(prefill(3, 10))  # the head's queue is full now
            submit = head.node.submit

            def refused_at_once(job) -> None:  # the real refusal, without its long wait
                if isinstance(job, StepJob) and job.plan.step_id == 4:
                    head.node._worker.submit(job, timeout=0.1)
                else:
                    submit(job)

            monkeypatch.setattr(head.node, "submit", refused_at_once)
            head.submit(prefill(4, 11, finished=(7,)))
            (refused,) = [r for r in head.poll(5.0) if r.step_id == 4]
            assert refused.error is not None and "overloaded" in refused.error
            assert refused.failure_kind is FailureKind.NONE  # its sequences: as before
            assert wait_until(lambda: ("h", 7) not in last.sequences, timeout=10.0)
        finally:
            gate.set()
        done = results_of(head, 3)
        assert sorted(r.step_id for r in done) == [1, 2, 3]
        assert all(r.error is None for r in done)
        assert wait_until(lambda: ("h", 7) not in own.sequences, timeout=10.0)
        assert ("h", 7) not in swarm.executors["a"].sequences
        assert ("h", 8) in last.sequences  # the others' KV stays
