"""After a node is lost, the nodes behind it on its routes are told directly to free its
sequences. That call travels apart from the steps: a replay of one of those sequences
through the same node may get there first. The release must then leave the replay's copy
alone (it names the first step not yet submitted at the loss; the node keeps copies that
later plans started)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from molink.pipeline.failover import FailoverDesk
from molink.pipeline.toy import expected_token
from molink.pipeline.worker import ReleaseJob, StepJob
from molink.placement.route import Route, RouteHop
from molink.step import ScheduledSequence, StepPlan
from tests.helpers.polling import first_result
from tests.helpers.toy_swarm import (
    PROMPT,
    REPLICAS_BEFORE_N,
    ToySwarm,
    prefill,
    toy_swarm,
    toy_worker,
)


@pytest.fixture
def swarm() -> Iterator[ToySwarm]:
    """head [0, 1); replicas a and b of [1, 2); n serves [2, 4) behind either."""
    with toy_swarm(REPLICAS_BEFORE_N) as swarm:
        yield swarm


def test_a_replay_that_overtakes_the_release_of_its_old_copy_keeps_its_kv(
    swarm, monkeypatch
) -> None:
    head = swarm.head
    gate, released = threading.Event(), threading.Event()
    original = FailoverDesk._release_directly

    def held_release(self, addresses, seq_ids, before):
        gate.wait(30.0)  # the release is slow to arrive: the replay gets there first
        original(self, addresses, seq_ids, before)
        released.set()

    monkeypatch.setattr(FailoverDesk, "_release_directly", held_release)
    head.submit(prefill(0, 7))
    assert first_result(head).error is None
    (lost,) = [node for node, count in head.routes.load().items() if count and node in ("a", "b")]
    assert head.evict_node(lost, "taken out by the test")
    head.submit(prefill(1, 7))  # the replay, through the other replica and n
    first = first_result(head)
    assert first.error is None
    gate.set()
    assert released.wait(30.0)
    token = first.sampled[0].token_id
    head.submit(StepPlan(2, (ScheduledSequence(7, len(PROMPT), 1, (), True),), (token,)))
    second = first_result(head)
    assert second.error is None, second.error
    assert second.sampled[0].token_id == expected_token(token, 7, 4)


@pytest.mark.parametrize(("before", "kept"), [(5, True), (6, False), (None, False)])
def test_a_release_frees_only_copies_older_than_its_step(before, kept) -> None:
    worker = toy_worker()
    route = Route((RouteHop("h", "x:1", 0, 1), RouteHop("s", "x:2", 1, 2)), "x:1")
    job = StepJob("h", route, prefill(5, 7), None)
    worker._admit(job)
    worker._release(ReleaseJob("h", None, (7,), False, before))
    assert (7 in worker._known["h"]) == kept
