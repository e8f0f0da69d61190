"""The head's steps in flight: each submitted step leaves poll() exactly once, an eviction
fails only the steps whose route passes the lost node, and overdue steps are found and
given another deadline while they are still in flight."""

from __future__ import annotations

from molink.pipeline.deadlines import DeadlinePolicy, StepDeadlines
from molink.pipeline.head_flights import StepFlights, error_result
from molink.placement.route import Route, RouteHop
from molink.step import FailureKind, SampledToken, ScheduledSequence, StepPlan, StepResult


def _route(*node_ids: str) -> Route:
    hops = tuple(RouteHop(n, f"{n}:1", i, i + 1) for i, n in enumerate(("head", *node_ids)))
    return Route(hops, "head:1")


def _plan(step_id: int, num_new: int = 1) -> StepPlan:
    return StepPlan(step_id, (ScheduledSequence(step_id, 0, num_new, (), True),), (1,) * num_new)


def _flights(now: list[float]) -> StepFlights:
    deadlines = StepDeadlines(DeadlinePolicy(2.0, 4.0), 30.0, dict, dict, clock=lambda: now[0])
    return StepFlights(deadlines)


def test_each_step_leaves_poll_once_and_is_counted():
    flights = _flights([100.0])
    flights.start(_plan(1), _route("a"))
    result = StepResult(1, sampled=(SampledToken(1, 7),))
    flights.complete(result)
    flights.complete(result)  # a late duplicate is dropped
    flights.complete(error_result((5, 0), "never sent"))  # not in flight: dropped
    assert flights.poll(0.0) == [result]
    assert flights.poll(0.0) == []
    counts = flights.counts()
    assert (counts.completed, counts.failed, counts.sampled) == (1, 0, 1)
    flights.refuse((2, 0), "no route", FailureKind.UNREACHABLE)
    [refused] = flights.poll(0.0)
    assert refused.failure_kind is FailureKind.UNREACHABLE and flights.counts().failed == 1


def test_an_eviction_fails_only_the_steps_through_the_lost_node():
    flights = _flights([100.0])
    flights.start(_plan(1), _route("a"))
    flights.start(_plan(2), _route("b"))
    flights.fail("a is gone", through="a", kind=FailureKind.DEADLINE)
    [failed] = flights.poll(0.0)
    assert (failed.step_id, failed.failure_kind, failed.failed_node_id) == (
        1,
        FailureKind.DEADLINE,
        "a",
    )
    assert flights.get((2, 0)) is not None and flights.get((1, 0)) is None


def test_overdue_steps_are_found_and_extended_while_in_flight():
    now = [100.0]
    flights = _flights(now)
    flights.start(_plan(1), _route("a"))
    assert flights.overdue(101.0) == []
    [(key, clock, route)] = flights.overdue(102.5)  # the 2 s floor passed
    assert key == (1, 0) and route.key == _route("a").key
    flights.extend(key, clock, 102.5)
    assert flights.overdue(103.0) == [] and clock.deadline == 104.5
    flights.complete(StepResult(1))
    flights.extend(key, clock, 110.0)  # no longer in flight: left alone
    assert clock.deadline == 104.5
