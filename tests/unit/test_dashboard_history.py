"""The charts' sampler goes on after a failed sample, and the finished requests it keeps
stay within the window even when no sample is taken."""

from __future__ import annotations

import asyncio

import pytest

import molink.dashboard as dashboard
from molink.dashboard.history import WINDOW_S, MetricsHistory
from molink.engine.protocol import EngineStats
from tests.unit.test_dashboard_snapshot import Clock, _finished


class FlakyStats:
    """Engine stats that fail the first ``failures`` times they are read."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def __call__(self) -> EngineStats:
        if self.failures:
            self.failures -= 1
            raise RuntimeError("the engine is busy stopping a stage")
        return EngineStats(1, 0, 10, 5)


class TickingClock(Clock):
    def __call__(self) -> float:
        self.now += 1.0  # a second between samples
        return self.now


def test_a_failed_sample_does_not_stop_the_charts(monkeypatch: pytest.MonkeyPatch) -> None:
    # One exception ended the sampling task: the charts froze for the rest of the server's
    # life, and every finished request was kept from then on.
    monkeypatch.setattr(dashboard, "SAMPLE_INTERVAL_S", 0.001)
    history = MetricsHistory(FlakyStats(failures=2), lambda: (0, 0), TickingClock())

    async def run() -> int:
        task = asyncio.create_task(dashboard._sample_forever(history))
        for _ in range(2000):  # bounded: about two seconds at most
            if len(history.points()) >= 3:
                break
            await asyncio.sleep(0.001)
        task.cancel()
        return len(history.points())

    assert asyncio.run(run()) >= 3


def test_finished_requests_are_kept_for_the_window_only_without_samples() -> None:
    clock = Clock()
    history = MetricsHistory(lambda: EngineStats(0, 0, 10, 10), lambda: (0, 0), clock)
    for _ in range(1000):
        clock.now += 1.0
        history.observe(_finished(0.0, 0.1, 0.5, 4))
    assert len(history._finished) <= WINDOW_S + 1


def test_the_charts_go_on_when_the_clock_steps_back() -> None:
    # Points are stamped with the wall clock and the pages ask for points after the last
    # they have: after the clock stepped back an hour, no sample was due for an hour, and
    # requests that finished before the step were kept (none of them looked old).
    clock = Clock()
    history = MetricsHistory(lambda: EngineStats(1, 0, 10, 5), lambda: (0, 0), clock)
    for _ in range(20):
        clock.now += 1.0
        history.observe(_finished(0.0, 0.1, 0.5, 4))
    assert history.sample_if_due()
    before = history.points()[-1]["t"]
    clock.now -= 3600.0
    for _ in range(1000):
        clock.now += 1.0
        history.observe(_finished(0.0, 0.1, 0.5, 4))
        assert history.sample_if_due()
    after = history.points(since=before)
    assert len(after) == 300  # the history keeps its last 300 points
    assert all(b["t"] > a["t"] for a, b in zip(after, after[1:], strict=False))
    assert len(history._finished) <= WINDOW_S + 1
    assert after[-1]["tokens_per_s"] == pytest.approx(4 * 11 / WINDOW_S)
