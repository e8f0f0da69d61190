"""A release sent apart from the steps (after a node was lost, or to a node taken back)
names the first step not yet submitted at the loss: steps older than that were failed at
the head. One of them may still reach a node after the release (a node before it held it,
or the node itself was frozen with it queued), and must not leave there KV that nothing
frees any more: a node drops an older step naming a sequence such a release named."""

from __future__ import annotations

import threading

from molink.pipeline.worker import ReleaseJob, StepJob
from molink.placement.route import Route, RouteHop
from molink.step import FailureKind, ScheduledSequence, StepPlan
from tests.helpers.polling import first_result, wait_until
from tests.helpers.toy_swarm import PROMPT, ToySwarm, hidden, prefill, toy_swarm, toy_worker
from tests.unit.test_failover_releases_in_flight import _hold_step

ROUTE = Route((RouteHop("h", "x:1", 0, 1), RouteHop("s", "x:2", 1, 2)), "x:1")


def _knows_a_is_back(swarm: ToySwarm, node_id: str) -> bool:
    """``node_id`` has the head's latest view, in which a is back (else it refuses a's
    steps, as a dropped node's)."""
    view = swarm.nodes[node_id].links.get("h")
    latest = swarm.head.pipeline().epoch
    return (
        view is not None
        and view.epoch >= latest
        and "a" not in swarm.nodes[node_id].links.dropped_by("h")
    )


def _worker_and_errors():
    errors: list[tuple[int, FailureKind]] = []
    worker = toy_worker(on_error=lambda job, message, kind: errors.append((job.plan.step_id, kind)))
    return worker, errors


def test_a_step_older_than_a_release_of_its_new_sequence_is_dropped() -> None:
    worker, errors = _worker_and_errors()
    worker._release(ReleaseJob("h", None, (8,), False, 2))
    worker._steps([StepJob("h", ROUTE, prefill(1, 8), hidden(prefill(1, 8)))])
    assert [step for step, _ in errors] == [1]
    assert 8 not in worker._known.get("h", set())
    assert ("h", 8) not in worker._executor.sequences


def test_a_step_from_the_release_bound_on_runs() -> None:
    worker, errors = _worker_and_errors()
    worker._release(ReleaseJob("h", None, (8,), False, 2))
    worker._steps([StepJob("h", ROUTE, prefill(2, 8), hidden(prefill(2, 8)))])
    assert errors == []
    assert ("h", 8) in worker._executor.sequences


def test_an_old_decode_step_leaves_a_replays_copy_alone() -> None:
    """The replay (step 5) restarted 7 here before the release (bound 3) came: the copy
    stays, and an old decode step of 7 (step 2) must not run on it."""
    worker, errors = _worker_and_errors()
    worker._steps([StepJob("h", ROUTE, prefill(5, 7), hidden(prefill(5, 7)))])
    worker._release(ReleaseJob("h", None, (7,), False, 3))
    assert 7 in worker._known["h"]
    old = StepPlan(2, (ScheduledSequence(7, len(PROMPT), 1, (), True),), (4,))
    worker._steps([StepJob("h", ROUTE, old, hidden(old))])
    assert [step for step, _ in errors] == [2]
    assert 7 in worker._known["h"]


def test_an_in_band_release_leaves_no_bound() -> None:
    """In band, a release follows the steps sent before it on the same stream: nothing
    older can come after it, and finished sequences are not remembered."""
    worker, errors = _worker_and_errors()
    worker._release(ReleaseJob("h", ROUTE, (8,), True, 2))
    worker._steps([StepJob("h", ROUTE, prefill(1, 8), hidden(prefill(1, 8)))])
    assert errors == []


def test_a_lapsed_lease_forgets_the_bounds() -> None:
    worker, errors = _worker_and_errors()
    worker._release(ReleaseJob("h", None, (8,), False, 2))
    worker._forget_head("h")
    worker._steps([StepJob("h", ROUTE, prefill(1, 8), hidden(prefill(1, 8)))])
    assert errors == []


def test_an_old_step_reaching_a_node_taken_back_after_its_release(monkeypatch) -> None:
    """head -> x -> a -> n: x holds step 1 (sequence 8's prefill) while a is evicted and
    taken back (its release of 7 and 8 names step 2); x then passes step 1 on to a. The
    failover's in-band release along the route is lost (the head's queue stayed full), so
    nothing frees 8 on a but its own release."""
    with toy_swarm((("x", 1, 2), ("a", 2, 3), ("n", 3, 4))) as swarm:
        head, held, before = swarm.head, swarm.executors["a"], swarm.executors["x"]
        head.submit(prefill(0, 7))
        assert first_result(head).error is None
        gate = threading.Event()
        try:
            reached = _hold_step(before, 1, gate, monkeypatch)
            head.submit(prefill(1, 8))
            assert reached.wait(30.0)
            monkeypatch.setattr(head._failover, "_submit", lambda job: None)
            assert head.evict_node("a", "taken out by the test")
            assert first_result(head).error is not None
            assert head.admit_discovered(swarm.nodes["a"].info) is None
            assert wait_until(lambda: ("h", 7) not in held.sequences, timeout=10.0)
            assert wait_until(lambda: _knows_a_is_back(swarm, "x"), timeout=10.0)
            worker = swarm.nodes["a"]._worker
            counts = (worker.steps_processed, worker.steps_failed)
        finally:
            gate.set()
        # x passes step 1 on to a
        assert wait_until(lambda: worker.steps_failed + worker.steps_processed > sum(counts), 10.0)
        assert not wait_until(lambda: ("h", 8) in held.sequences, timeout=1.0)
        assert (worker.steps_processed, worker.steps_failed) == (counts[0], counts[1] + 1)


def test_a_thawed_node_passes_on_an_old_step_after_the_release_behind_it(monkeypatch) -> None:
    """head -> a -> n: a's compute is stuck in step 1 (sequence 8's prefill) while it is
    evicted (n is told to free 8, naming step 2) and taken back; it thaws and passes step 1
    on to n. The failover's in-band release along the route is lost (the head's queue
    stayed full), so nothing frees 8 on n but the release it got first."""
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, last = swarm.head, swarm.executors["n"]
        gate = threading.Event()
        try:
            reached = _hold_step(swarm.executors["a"], 1, gate, monkeypatch)
            head.submit(prefill(1, 8))
            assert reached.wait(30.0)
            monkeypatch.setattr(head._failover, "_submit", lambda job: None)
            assert head.evict_node("a", "taken out by the test")
            assert first_result(head).error is not None
            assert head.admit_discovered(swarm.nodes["a"].info) is None
            assert wait_until(lambda: _knows_a_is_back(swarm, "n"), timeout=10.0)
            worker = swarm.nodes["n"]._worker
            counts = (worker.steps_processed, worker.steps_failed)
        finally:
            gate.set()
        # a runs step 1 and passes it on, then frees 8 (its own release, queued behind)
        assert wait_until(lambda: ("h", 8) not in swarm.executors["a"].sequences, 10.0)
        assert wait_until(lambda: worker.steps_failed + worker.steps_processed > sum(counts), 10.0)
        assert not wait_until(lambda: ("h", 8) in last.sequences, timeout=1.0)
        assert (worker.steps_processed, worker.steps_failed) == (counts[0], counts[1] + 1)
