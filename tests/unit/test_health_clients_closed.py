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
