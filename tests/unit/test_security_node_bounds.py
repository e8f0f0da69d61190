"""Node-wide bounds hold whatever identities callers present: any member can mint fresh
node ids (the swarm authority derives from the shared key), each with its own per-peer
allowance, so a per-peer bound alone does not bound the node."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import grpc
import pytest

from tests.helpers.polling import first_result, wait_until
from tests.unit.test_security_authorization import (
    BASE,
    HOLD_S,
    Swarm,
    _prefill,
    _refused_stream,
    idle_until,
    member,
    running_swarm,
)


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    with running_swarm() as running:
        yield running


def test_streams_of_minted_identities_are_bounded_per_node(swarm: Swarm) -> None:
    release = threading.Event()
    streams = swarm.last.streams
    channels, calls = [], []
    try:
        # A fresh identity per stream, each well within its own allowance, one at a time
        # (counted by the node before the next), until the node is full.
        while streams.total() < BASE.max_streams_per_node:
            minted = member()
            channel, stub = swarm.stub(swarm.last.address, minted)
            channels.append(channel)
            calls.append(stub.Forward(idle_until(release), timeout=HOLD_S))
            node_id = minted.security.node_id
            assert wait_until(lambda node_id=node_id: streams.held(node_id) == 1)
        channel, stub = swarm.stub(swarm.last.address, member())
        channels.append(channel)
        refused = _refused_stream(stub)
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "already holds 6 streams of its peers" in refused.details()
        assert streams.total() == BASE.max_streams_per_node
    finally:
        release.set()
        for call in calls:
            list(call)
        for channel in channels:
            channel.close()
    assert wait_until(lambda: streams.total() <= 1)  # at most the route's own stream
    swarm.head.submit(_prefill(1, 5, (10,)))
    assert first_result(swarm.head).error is None
