"""The head's health monitor keeps one gRPC client per node it checks. A node leaving
the pipeline for any reason (evicted, replaced), not only by failing its health checks,
must have that client closed and forgotten, or its channel lives as long as the head;
a node taken back later gets a fresh client that works."""

from __future__ import annotations

import pytest

from tests.helpers.toy_swarm import toy_swarm


def test_an_evicted_node_loses_its_client_and_a_returning_one_gets_a_fresh_one() -> None:
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, info = swarm.head, swarm.nodes["a"].info
        monitor = head._monitor
        assert monitor.probe(info) is None
        key = (info.address, info.node_id)
        old = monitor._clients[key]
        assert head.evict_node("a", "missed a step deadline, then a probe")
        assert key not in monitor._clients
        with pytest.raises(ValueError, match="closed channel"):
            old.stub.Health(monitor._request(), timeout=5.0)
        assert head.admit_discovered(info) is None
        assert monitor.probe(info) is None
        assert monitor._clients[key] is not old


def test_a_node_replaced_at_a_new_address_loses_its_old_client() -> None:
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, info = swarm.head, swarm.nodes["a"].info
        monitor = head._monitor
        assert monitor.probe(info) is None
        old = monitor._clients[(info.address, info.node_id)]
        moved = info.with_address("127.0.0.1:1")  # the same id registered elsewhere
        assert head.admit_discovered(moved) is None
        assert (info.address, info.node_id) not in monitor._clients
        with pytest.raises(ValueError, match="closed channel"):
            old.stub.Health(monitor._request(), timeout=5.0)


def test_a_push_of_an_older_view_opens_no_client_to_a_node_that_left() -> None:
    # The push thread works from the view it was started with; a node evicted meanwhile
    # (its client closed by the prune) must not get a new client, nor the pushed view.
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, info = swarm.head, swarm.nodes["a"].info
        monitor = head._monitor
        older = head._registry.view()
        assert head.evict_node("a", "missed a step deadline, then a probe")
        monitor._push(older, [info])
        assert (info.address, info.node_id) not in monitor._clients


def test_a_probe_of_a_node_that_left_fails_without_opening_a_client() -> None:
    # A probe started before an eviction (a suspect's thread) reaches the monitor after
    # it: the node is no longer the head's to call.
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, info = swarm.head, swarm.nodes["a"].info
        monitor = head._monitor
        assert head.evict_node("a", "missed a step deadline, then a probe")
        assert monitor.probe(info) == "no longer in the pipeline"
        assert (info.address, info.node_id) not in monitor._clients
