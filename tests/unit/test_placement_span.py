"""Automatic placement: missing layers first, then a replica of the weakest span."""

from __future__ import annotations

import pytest

from molink.errors import PipelineError
from molink.placement.placement import ServedSpan, choose_span
from molink.placement.router import Candidate, best_route


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
    with pytest.raises(PipelineError, match="holds no layer"):
        choose_span(30, [ServedSpan(0, 12)], max_layers=0)


def _on_a_route(swarm: list[ServedSpan], replica: tuple[int, int], replaced: int) -> bool:
    """Whether a route over ``swarm`` with the replica in place of ``swarm[replaced]`` exists."""
    nodes = [Candidate(f"n{i}", "", s.start, s.end) for i, s in enumerate(swarm) if i]
    nodes = [n for n in nodes if n.node_id != f"n{replaced}"]
    nodes.append(Candidate("replica", "", *replica))
    head = Candidate("n0", "", swarm[0].start, swarm[0].end)
    return best_route(head, nodes, swarm[-1].end, "") is not None


def test_a_replica_ends_where_a_route_can_go_on() -> None:
    # A replica cut short by memory, or sized by speed, to end where no node starts was
    # on no route: a route passes from one node to the next only where spans meet.
    swarm = [ServedSpan(0, 4), ServedSpan(4, 12, 10.0, 0.004), ServedSpan(12, 24, 50.0)]
    for max_layers, step_s in [(100, 0.002), (100, 0.008), (13, 0.002), (9, 0.0)]:
        placement = choose_span(24, swarm, max_layers, step_s)
        assert placement.start == 4 and placement.end in (12, 24), (max_layers, step_s)
        assert placement.end - placement.start <= max_layers
        assert _on_a_route(swarm, (placement.start, placement.end), replaced=1)


def test_a_replica_that_fits_nowhere_usable_is_an_error_or_goes_elsewhere() -> None:
    swarm = [ServedSpan(0, 4), ServedSpan(4, 12, 10.0), ServedSpan(12, 24, 50.0)]
    with pytest.raises(PipelineError, match=r"holds 5 layer\(s\), too few.*\[4, 12\), has 8"):
        choose_span(24, swarm, max_layers=5)
    short = [ServedSpan(0, 4), ServedSpan(4, 12, 10.0), ServedSpan(12, 14, 50.0)]
    placement = choose_span(14, short, max_layers=5)  # [4, 12) is weakest but does not fit
    assert (placement.start, placement.end) == (12, 14)


def test_another_heads_layers_do_not_count_as_served_for_routes() -> None:
    # Heads [0, 4) and [0, 6) with one node [6, 24): the first head has no route, as no
    # node starts at 4. Layers 4 and 5 counted as served (by the second head, which
    # serves no one's route), so the joining node replicated [6, 24) instead.
    swarm = [ServedSpan(0, 4), ServedSpan(0, 6), ServedSpan(6, 24, 50.0)]
    placement = choose_span(24, swarm, max_layers=100)
    assert (placement.start, placement.end) == (4, 6)
    assert "served by no node" in placement.reason


def test_spans_outside_the_model_are_left_out() -> None:
    # A span past the last layer raised IndexError; one starting below 0 counted, through
    # negative indexing, as serving the last layers.
    for bad in (ServedSpan(4, 30), ServedSpan(-2, 8), ServedSpan(8, 6)):
        placement = choose_span(24, [ServedSpan(0, 4), bad], max_layers=100)
        assert (placement.start, placement.end) == (4, 24), bad


def test_spans_that_do_not_meet_are_joined() -> None:
    # Every layer served, but no route: [10, 20) and [15, 30) do not meet, nor do [0, 10)
    # and [8, 30). The joining node became a replica of a span (no route still), or
    # placement failed; it now takes the shortest span that makes a route.
    overlap = [ServedSpan(0, 10), ServedSpan(10, 20, 5.0), ServedSpan(15, 30, 5.0)]
    placement = choose_span(30, overlap, max_layers=100)
    assert (placement.start, placement.end) == (10, 15)
    assert "no route" in placement.reason
    nodes = [Candidate(f"n{i}", "", s.start, s.end) for i, s in enumerate(overlap) if i]
    head = Candidate("head", "", 0, 10)
    assert best_route(head, nodes, 30, "") is None
    assert best_route(head, [*nodes, Candidate("new", "", 10, 15)], 30, "") is not None
    behind = [ServedSpan(0, 10), ServedSpan(8, 30, 5.0)]
    joined = choose_span(30, behind, 100)
    assert (joined.start, joined.end) == (10, 30)
    with pytest.raises(PipelineError, match=r"holds 5 layer\(s\).*\[10, 30\), has 20"):
        choose_span(30, behind, max_layers=5)  # no span it can hold makes a route
