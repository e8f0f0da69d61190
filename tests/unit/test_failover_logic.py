"""The pieces of failover that need no network: deadlines, leases, the failover timeout,
the counters."""

from __future__ import annotations

import pytest

from molink.engine.recovery import RecoveryStats, UnservedTimer
from molink.engine.telemetry import StageTiming
from molink.pipeline.deadlines import DeadlinePolicy, StepDeadlines
from molink.pipeline.leases import LeaseTable
from molink.placement.route import Route, RouteHop


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _route() -> Route:
    return Route((RouteHop("head", "h:1", 0, 2), RouteHop("a", "a:1", 2, 4)), "h:1")


def _deadlines(clock: _Clock, timings: dict, rtts: dict) -> StepDeadlines:
    return StepDeadlines(DeadlinePolicy(2.0, 4.0), 120.0, lambda: timings, lambda: rtts, clock)


def test_an_unmeasured_route_gets_the_floor() -> None:
    clock = _Clock()
    step = _deadlines(clock, {}, {}).clock_for(_route(), 16, 0)
    assert step.deadline == pytest.approx(102.0)
    assert step.hard_deadline == pytest.approx(220.0)


def test_the_deadline_follows_measured_compute_links_and_steps_ahead() -> None:
    clock = _Clock()
    timings = {
        "head": StageTiming("head", 0.1, 0.01, 5),
        "a": StageTiming("a", 0.4, 0.02, 5),
        "b": StageTiming("b", 9.0, 0.0, 5),  # not on the route
    }
    deadlines = _deadlines(clock, timings, {"a": 0.05})
    # head 0.1 + 10 * 0.01, a 0.4 + 10 * 0.02 + 0.05 round trip = 0.85 s
    assert deadlines.expected_s(_route(), 10) == pytest.approx(0.85)
    step = deadlines.clock_for(_route(), 10, steps_ahead=1)
    assert step.budget_s == pytest.approx(4.0 * 0.85 * 2)
    clock.now += 100.0
    step.extend(clock.now)  # every node answered its probe: another deadline, capped
    assert step.deadline == pytest.approx(min(200.0 + step.budget_s, step.hard_deadline))


def test_a_lease_lapses_once_after_silence_and_restarts_with_traffic() -> None:
    clock = _Clock()
    leases = LeaseTable(10.0, clock)
    leases.renew("h1")
    leases.renew("h2")
    leases.renew("")  # a probe that names no head renews nothing
    clock.now += 6
    leases.renew("h2")
    clock.now += 5
    assert leases.lapsed() == ["h1"]
    assert leases.lapsed() == []  # reported once
    # A step received before the lapse is stale; one received after it is not, and a
    # head that never lapsed makes no step stale however long it queued.
    assert leases.lapsed_since("h1", clock.now - 1) and not leases.lapsed_since("h1", clock.now + 1)
    assert not leases.lapsed_since("h2", 0.0)
    assert not leases.holds("h1") and leases.holds("h2")
    leases.renew("h1")  # a head that speaks again (e.g. restarted) starts a new lease
    assert leases.holds("h1")


def test_unserved_requests_expire_after_the_failover_timeout() -> None:
    clock = _Clock()
    timer = UnservedTimer(30.0, clock)
    assert timer.expired("layers [2, 4) are not served by any node", True) is None
    clock.now += 29
    assert timer.expired("layers [2, 4) are not served by any node", True) is None
    clock.now += 2
    message = timer.expired("layers [2, 4) are not served by any node", True)
    assert message is not None and "layers [2, 4)" in message and "30s" in message


def test_a_route_back_or_no_request_resets_the_failover_timeout() -> None:
    clock = _Clock()
    timer = UnservedTimer(10.0, clock)
    timer.expired("missing", True)
    clock.now += 8
    assert timer.expired(None, True) is None  # a node joined
    clock.now += 8
    assert timer.expired("missing", True) is None  # counts again from here
    assert timer.expired("missing", False) is None  # nothing waits
    clock.now += 20
    assert timer.expired("missing", True) is None
    with pytest.raises(ValueError):
        UnservedTimer(0)


def test_recovery_counters_in_prometheus_text() -> None:
    stats = RecoveryStats()
    stats.note_failover()
    stats.note_replayed(3, 120)
    stats.observe_recovery(0.7)
    stats.observe_recovery(3.0)
    lines = dict(line.rsplit(" ", 1) for line in stats.metric_lines() if not line.startswith("#"))
    assert lines["molink:failovers_total"] == "1"
    assert lines["molink:replayed_sequences_total"] == "3"
    assert lines["molink:replayed_tokens_total"] == "120"
    assert lines['molink:failover_recovery_seconds_bucket{le="1.0"}'] == "1"
    assert lines['molink:failover_recovery_seconds_bucket{le="+Inf"}'] == "2"
    assert float(lines["molink:failover_recovery_seconds_max"]) == pytest.approx(3.0)
