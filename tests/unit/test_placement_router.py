"""The routing rule: Dijkstra over spans that meet, by expected step time."""

from __future__ import annotations

from molink.placement.route import Route, RouteHop
from molink.placement.router import Candidate, LinkCost, best_route, unreachable_layers

HEAD = Candidate("head", "h:1", 0, 10)


def _node(node_id: str, start: int, end: int, **kw: object) -> Candidate:
    return Candidate(node_id, f"{node_id}:1", start, end, **kw)


def _ids(found: tuple[Route, float] | None) -> list[str]:
    assert found is not None
    return [hop.node_id for hop in found[0].hops]


def test_the_route_covers_every_layer_through_meeting_spans() -> None:
    nodes = [_node("a", 10, 20), _node("b", 20, 30), _node("x", 15, 30)]
    assert _ids(best_route(HEAD, nodes, 30, "h:1")) == ["head", "a", "b"]
    assert best_route(HEAD, [_node("x", 15, 30)], 30, "h:1") is None
    assert unreachable_layers(HEAD, [_node("x", 15, 30)], 30) == 10
    assert unreachable_layers(HEAD, nodes, 30) is None


def test_the_nearer_replica_wins_and_load_spreads_equal_ones() -> None:
    near, far = _node("near", 10, 20, rtt_s=0.002), _node("far", 10, 20, rtt_s=0.1)
    assert _ids(best_route(HEAD, [far, near], 20, "h:1")) == ["head", "near"]
    # Equal replicas: the one with fewer of this head's sequences.
    a, b = _node("a", 10, 20, load=3), _node("b", 10, 20, load=2)
    assert _ids(best_route(HEAD, [a, b], 20, "h:1")) == ["head", "b"]
    # Enough load moves new sequences to the far replica: each costs per_seq_s.
    busy = _node("near", 10, 20, rtt_s=0.002, per_seq_s=0.01, load=20)
    assert _ids(best_route(HEAD, [far, busy], 20, "h:1")) == ["head", "far"]


def test_measured_links_and_compute_count() -> None:
    a, b = _node("a", 10, 20), _node("b", 10, 20)
    slow_link = {("head", "a"): LinkCost(bandwidth_bytes_per_s=1e5, rtt_s=0.001)}
    found = best_route(
        HEAD, [a, b], 20, "h:1", step_bytes=1e4, links=lambda x, y: slow_link.get((x, y))
    )
    assert _ids(found) == ["head", "b"]  # 0.1 s to send a step to a
    slow, fast = _node("a", 10, 20, step_s=0.5), _node("b", 10, 20, step_s=0.1)
    assert _ids(best_route(HEAD, [slow, fast], 20, "h:1")) == ["head", "b"]
    queued = _node("a", 10, 20, queued=50)
    assert _ids(best_route(HEAD, [queued, b], 20, "h:1")) == ["head", "b"]


def test_nodes_without_kv_room_are_left_out() -> None:
    full, free = _node("a", 10, 20, room_blocks=1), _node("b", 10, 20, rtt_s=1.0, room_blocks=9)
    assert _ids(best_route(HEAD, [full, free], 20, "h:1", blocks_needed=4)) == ["head", "b"]
    assert best_route(HEAD, [full], 20, "h:1", blocks_needed=4) is None


def test_a_head_that_serves_everything_is_its_own_route() -> None:
    assert _ids(best_route(Candidate("solo", "s:1", 0, 8), [], 8, "s:1")) == ["solo"]


def test_route_problems_are_named() -> None:
    good = Route((RouteHop("h", "h:1", 0, 10), RouteHop("a", "a:1", 10, 20)), "h:1")
    assert good.problem(20) is None and good.next_after("h").node_id == "a"
    assert good.next_after("a") is None and good.key == "h->a"
    gap = Route((RouteHop("h", "h:1", 0, 10), RouteHop("a", "a:1", 12, 20)), "h:1")
    assert "where layer 10 should start" in gap.problem(20)
    assert "ends at layer 20, not at 30" in good.problem(30)
    twice = Route((RouteHop("h", "h:1", 0, 10), RouteHop("h", "a:1", 10, 20)), "h:1")
    assert "names a node twice" in twice.problem(20)
    assert "empty" in Route((), "").problem(1)


def test_a_node_not_measured_yet_is_taken_as_fast_as_its_measured_peers() -> None:
    """A restarted replica has no timings: it does not look faster than a measured one (the
    priors would), so load decides between them."""
    measured = _node("a", 10, 20, step_s=0.1, per_seq_s=0.001)
    assert _ids(best_route(HEAD, [measured, _node("b", 10, 20, load=3)], 20, "h:1")) == [
        "head",
        "a",
    ]
    busy = _node("a", 10, 20, step_s=0.1, per_seq_s=0.001, load=3)
    assert _ids(best_route(HEAD, [busy, _node("b", 10, 20)], 20, "h:1")) == ["head", "b"]
    # Per layer: a node of half the layers is assumed to take half the time.
    short = _node("c", 10, 15)
    long = _node("d", 10, 20, step_s=0.2, per_seq_s=0.002)
    tail = _node("e", 15, 20, step_s=0.2, per_seq_s=0.002)
    assert _ids(best_route(HEAD, [short, long, tail], 20, "h:1")) == ["head", "d"]


def test_a_node_not_probed_yet_is_taken_as_near_as_its_probed_peers() -> None:
    """The priors' 1 ms round trip would make a just-joined replica look nearer than any
    probed one on a loaded machine; load decides instead."""
    probed = _node("a", 10, 20, rtt_s=0.05)
    assert _ids(best_route(HEAD, [probed, _node("b", 10, 20, load=1)], 20, "h:1")) == [
        "head",
        "a",
    ]
    busy = _node("a", 10, 20, rtt_s=0.05, load=1)
    assert _ids(best_route(HEAD, [busy, _node("b", 10, 20)], 20, "h:1")) == ["head", "b"]


def test_a_link_reported_with_numbers_that_are_no_measurement_counts_as_unmeasured() -> None:
    # Links are reported by the nodes themselves. A NaN or negative bandwidth cost the hop
    # an infinite time, and with no other way round the head had no route at all.
    a = _node("a", 10, 20)
    for bandwidth, rtt in [(float("nan"), float("nan")), (-1.0, -1.0), (0.0, float("inf"))]:
        bad = LinkCost(bandwidth_bytes_per_s=bandwidth, rtt_s=rtt)
        found = best_route(HEAD, [a], 20, "h:1", step_bytes=1e4, links=lambda x, y, c=bad: c)
        unmeasured = best_route(HEAD, [a], 20, "h:1", step_bytes=1e4)
        assert found is not None and unmeasured is not None, (bandwidth, rtt)
        assert found[1] == unmeasured[1]
