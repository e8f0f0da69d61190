"""Two micro-batches in flight on different routes, and steps whose route loses a node
between the moment it was chosen and the moment the step leaves. Every order of events
is forced by the test, none left to timing:

* both results are back at the head before the first poll: one poll returns both, and
  the tests' helper takes both (it used to keep the first and drop the other, which read
  as a step whose result never came back);
* the route's node is evicted after the route was chosen and before the step is on
  record: the step fails at once, typed, instead of travelling to the evicted node (a
  frozen one never answers; the nodes after a live one drop it silently, as coming
  through a node their head dropped) and waiting for its hard deadline;
* a step already on record on a route whose node was evicted, and overdue: it fails at
  the next deadline check, not at its hard deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from molink.pipeline import PipelineExecutor, StageNode
from molink.pipeline.route_book import BookChoice
from molink.pipeline.toy import expected_token
from molink.placement.route import Route, RouteHop
from molink.step import FailureKind, ScheduledSequence, StepPlan
from molink.transport.config import TransportConfig
from tests.helpers.polling import first_result, results_of, wait_until
from tests.helpers.toy_swarm import PROMPT, REPLICAS_BEFORE_N, prefill, toy_swarm

# Hard deadlines far beyond every wait here: a step that is not failed on purpose would
# show as a missing result, not as a late DEADLINE error.
CONFIG = TransportConfig(step_timeout_s=120.0, health_interval_s=60.0, lease_s=300.0)
WAIT_S = 20.0


@dataclass
class Swarm:
    head: PipelineExecutor
    nodes: dict[str, StageNode]
    thawed: threading.Event  # set at the end: a frozen node's receiving threads return

    def freeze(self, node_id: str) -> None:
        """``node_id`` takes steps off the wire and never acknowledges or computes them,
        as a process stopped with SIGSTOP (its sockets stay open)."""
        worker = self.nodes[node_id]._worker
        worker.submit = lambda job, timeout: self.thawed.wait(WAIT_S * 3)  # type: ignore[method-assign]


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    """head [0, 1); replicas a and b of [1, 2); n serves [2, 4) behind either."""
    thawed = threading.Event()
    with toy_swarm(REPLICAS_BEFORE_N, CONFIG) as toy:
        try:
            yield Swarm(toy.head, toy.nodes, thawed)
        finally:
            thawed.set()


def _route_through(head: PipelineExecutor, replica: str) -> Route:
    stages = {s.node_id: s for s in head.pipeline().stages}
    hops = tuple(
        RouteHop(n, stages[n].address, stages[n].layers.start, stages[n].layers.end)
        for n in ("h", replica, "n")
    )
    return Route(hops, head.address)


def _submit_on(head: PipelineExecutor, plan: StepPlan, replica: str) -> None:
    """``plan`` goes through ``replica``, as the engine's router binds a plan to a route."""
    head.routes.bind(plan, BookChoice(head.routes, _route_through(head, replica), True))
    head.submit(plan)


def test_two_micro_batches_on_two_routes_both_come_back(swarm: Swarm) -> None:
    head = swarm.head
    _submit_on(head, prefill(0, 1, micro_batch=0), "a")
    _submit_on(head, prefill(1, 2, micro_batch=1), "b")
    assert wait_until(lambda: head.metrics().steps_completed == 2, WAIT_S)
    results = results_of(head, 2)  # one poll has both
    by_step = {r.step_id: r for r in results}
    assert sorted(by_step) == [0, 1]
    for step_id, seq_id in ((0, 1), (1, 2)):
        assert by_step[step_id].error is None, by_step[step_id].error
        assert by_step[step_id].sampled[0].token_id == expected_token(PROMPT[-1], seq_id, 4)
    assert {s: head.routes.route_of(s).key for s in (1, 2)} == {1: "h->a->n", 2: "h->b->n"}

    # The helper for one step in flight refuses to pick one of two.
    _submit_on(head, prefill(2, 3, micro_batch=0), "a")
    _submit_on(head, prefill(3, 4, micro_batch=1), "b")
    assert wait_until(lambda: head.metrics().steps_completed == 4, WAIT_S)
    with pytest.raises(AssertionError, match="2 results came back, 1 expected"):
        first_result(head)


def test_a_step_whose_route_loses_a_node_before_it_is_on_record_fails_at_once(
    swarm: Swarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    head = swarm.head
    _submit_on(head, prefill(0, 1), "a")
    assert first_result(head, WAIT_S).error is None
    swarm.freeze("a")  # a step that reached it would never come back
    start = head._flights.start

    def evicted_first(plan, route):
        # The eviction runs between the route's choice and the step's record.
        assert head.evict_node("a", "taken out by the test")
        start(plan, route)

    monkeypatch.setattr(head._flights, "start", evicted_first)
    decode = StepPlan(1, (ScheduledSequence(1, len(PROMPT), 1, (), True),), (7,))
    sent = time.monotonic()
    head.submit(decode)
    result = first_result(head, WAIT_S)
    assert time.monotonic() - sent < 5.0  # not the hard deadline
    assert result.failure_kind is FailureKind.UNREACHABLE, result
    assert result.failed_node_id == "a" and "is gone" in (result.error or "")
    assert head.metrics().steps_failed == 1
    # The sequence was on the lost route: it is handed to the engine for replay.
    assert [f.seq_ids for f in head.take_failures()] == [(1,)]


def test_an_overdue_step_on_a_route_without_one_of_its_nodes_fails_at_the_next_check(
    swarm: Swarm,
) -> None:
    head = swarm.head
    route = _route_through(head, "a")
    head._flights.start(prefill(0, 1), route)  # on record; its result will never come
    assert head.evict_node("b", "unrelated")  # a node of another route: nothing fails
    assert head.poll(0.0) == []
    # The node of its route leaves the registry without the step being failed with it
    # (as when a step left after the eviction's failures were sent).
    assert head._registry.remove("a") is not None
    late = time.monotonic() + 60.0
    head._detection.handle_overdue(head._flights.overdue(late))
    result = first_result(head, WAIT_S)
    assert result.failure_kind is FailureKind.UNREACHABLE and result.failed_node_id == "a"
    assert "was evicted" in (result.error or "")
