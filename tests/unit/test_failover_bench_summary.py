"""The failover bench's per-stream figures: a moved stream's token that was on its way
when the replica died does not count as its recovery."""

from __future__ import annotations

import math

from bench.failover_bench import _bins, _longest_pause, _resumed_after

KILL = 100.0


def test_a_token_on_its_way_at_the_kill_is_not_the_recovery() -> None:
    # Tokens every 0.2 s, one more 0.1 s after the kill (sent before it), then the replay.
    moved = [99.4, 99.6, 99.8, 100.1, 108.0, 108.2]
    assert math.isclose(_resumed_after(moved, KILL), 8.0)
    assert math.isclose(_longest_pause(moved, KILL), 7.9)


def test_a_stream_on_the_survivor_resumes_at_its_slowest_step() -> None:
    survivor = [99.8, 100.3, 100.6, 101.5, 101.7]
    assert math.isclose(_resumed_after(survivor, KILL), 1.5)
    assert math.isnan(_resumed_after([99.0], KILL))


def test_tokens_fall_in_one_second_bins_around_the_kill() -> None:
    bins = _bins([95.0, 95.5, 99.9, 100.0, 104.99, 105.0], KILL)
    assert bins == [2, 0, 0, 0, 1, 1, 0, 0, 0, 1]
