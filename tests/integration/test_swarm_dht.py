"""The swarm's DHT (hivemind, its own daemons on 127.0.0.1): records are found, expire when
not renewed, and an unreachable bootstrap peer is a clear error well within 30 s."""

from __future__ import annotations

import time

import pytest

from molink.config import LayerRange
from molink.discovery.announcer import Announcer
from molink.discovery.dht import BOOTSTRAP_TIMEOUT_S, SwarmDirectory
from molink.errors import PipelineError
from molink.pipeline.identity import NodeInfo
from molink.pipeline.toy import toy_identity
from molink.transport import PROTOCOL_VERSION

pytestmark = pytest.mark.integration

MODEL = toy_identity(4)
TTL_S = 3.0


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def test_records_are_found_renewed_and_expire() -> None:
    first = SwarmDirectory(MODEL, PROTOCOL_VERSION).start("127.0.0.1", [])
    second = SwarmDirectory(MODEL, PROTOCOL_VERSION).start("127.0.0.1", [first.address])
    try:
        info = NodeInfo(
            "s1", MODEL, LayerRange(2, 4), "127.0.0.1:5", 10, 16, protocol_version=PROTOCOL_VERSION
        )
        announcer = Announcer(second, lambda: info, TTL_S).start()
        assert _wait(lambda: "s1" in first.nodes(), 10)
        time.sleep(TTL_S * 1.5)  # renewed meanwhile
        assert "s1" in first.nodes()
        announcer.stop()  # withdraws: an expired copy replaces the record
        assert _wait(lambda: "s1" not in first.nodes(), TTL_S + 5)
        stranger = NodeInfo(
            "x", toy_identity(6), LayerRange(0, 6), "127.0.0.1:6", protocol_version=4
        )
        second.announce(stranger, TTL_S)
        time.sleep(0.5)
        assert "x" not in first.nodes()  # another model's record is ignored
    finally:
        second.shutdown()
        first.shutdown()


def test_an_unreachable_bootstrap_peer_is_a_clear_error() -> None:
    dead = "/ip4/127.0.0.1/tcp/9/p2p/12D3KooWADCcWErRLczC3a4FkzmrBVFat5XdCkkbMwZMNxrGhozg"
    started = time.monotonic()
    with pytest.raises(PipelineError, match="could not join the DHT through /ip4/127.0.0.1/tcp/9"):
        SwarmDirectory(MODEL, PROTOCOL_VERSION).start("127.0.0.1", [dead])
    assert time.monotonic() - started < BOOTSTRAP_TIMEOUT_S
