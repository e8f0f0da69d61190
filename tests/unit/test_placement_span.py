"""Automatic placement: missing layers first, then a replica of the weakest span."""

from __future__ import annotations

import pytest

from molink.errors import PipelineError
from molink.placement.placement import ServedSpan, choose_span, layers_that_fit


def test_the_missing_span_is_taken_exactly_or_as_far_as_memory_allows() -> None:
    placement = choose_span(30, [ServedSpan(0, 12)], max_layers=40)
    assert (placement.start, placement.end) == (12, 30)
    assert "served by no node" in placement.reason
    assert (choose_span(30, [ServedSpan(0, 12)], max_layers=5).end) == 17
    gap = choose_span(30, [ServedSpan(0, 10), ServedSpan(20, 30)], max_layers=40)
    assert (gap.start, gap.end) == (10, 20)


def test_a_full_swarm_gets_a_replica_of_its_weakest_span() -> None:
    swarm = [ServedSpan(0, 10), ServedSpan(10, 20, 50.0), ServedSpan(20, 30, 20.0)]
    placement = choose_span(30, swarm, max_layers=40)
    assert (placement.start, placement.end) == (20, 30) and "replica" in placement.reason
    # Equal strength: the first span after the head.
    equal = choose_span(30, [ServedSpan(0, 10), ServedSpan(10, 30)], max_layers=40)
    assert (equal.start, equal.end) == (10, 30)


def test_memory_decides_the_size() -> None:
    assert layers_that_fit(10_000, 900, 100) == 10
    assert layers_that_fit(500, 900, 100) == 0
    with pytest.raises(PipelineError, match="holds no layer"):
        choose_span(30, [ServedSpan(0, 12)], max_layers=0)
