"""The swarm's DHT against outsiders (hivemind daemons on 127.0.0.1).

hivemind's libp2p daemon has no membership of its own, so an outsider can join the DHT's
routing; what it cannot do is read the swarm's records or get any record stored on a
member (molink.security.sealing). The outsider here is the strongest one: it knows the
swarm's DHT key name (which a real one cannot derive without the swarm key) and writes with
hivemind directly, plain records and records sealed with another key.
"""

from __future__ import annotations

import time

import hivemind
import msgpack
import pytest
from hivemind.utils import get_dht_time

from molink.config import LayerRange
from molink.discovery.dht import SwarmDirectory
from molink.discovery.records import record_of, swarm_key
from molink.pipeline.identity import NodeInfo
from molink.pipeline.toy import toy_identity
from molink.security.credentials import SwarmCredentials
from molink.security.sealing import RecordSeal
from molink.security.swarm_key import generate_swarm_key
from molink.transport import PROTOCOL_VERSION

pytestmark = pytest.mark.integration

MODEL = toy_identity(4)
KEY = generate_swarm_key()
TTL_S = 30.0


def _info(node_id: str, address: str) -> NodeInfo:
    return NodeInfo(node_id, MODEL, LayerRange(2, 4), address, 10, 16)


def _wait(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.2)
    return False


@pytest.fixture
def members():
    first = SwarmDirectory(MODEL, PROTOCOL_VERSION, SwarmCredentials.from_key(KEY))
    first.start("127.0.0.1", [])
    member = SwarmCredentials.from_key(KEY)
    second = SwarmDirectory(MODEL, PROTOCOL_VERSION, member)
    second.start("127.0.0.1", [first.address])
    try:
        yield first, second, member
    finally:
        second.shutdown()
        first.shutdown()


def test_outsiders_cannot_read_or_write_the_swarms_records(members) -> None:
    first, second, member = members
    key = RecordSeal(member).scoped(swarm_key(MODEL))
    honest = _info(member.node_id, "10.9.8.7:50051")
    assert second.announce(honest, TTL_S)
    assert _wait(lambda: member.node_id in first.nodes(), 10)
    assert first.nodes()[member.node_id][0] == honest

    outsider = hivemind.DHT(
        initial_peers=[first.address], host_maddrs=["/ip4/127.0.0.1/tcp/0"], start=True
    )
    try:
        found = outsider.get(key, latest=True)
        assert found is not None and member.node_id in found.value  # it sees a sealed blob...
        stolen = found.value[member.node_id].value
        assert isinstance(stolen, bytes) and b"10.9.8.7" not in stolen  # ...it cannot read
        wrong_key = SwarmCredentials.from_key(generate_swarm_key())
        assert RecordSeal(wrong_key).open(stolen, member.node_id) == (
            None,
            "not sealed with this swarm's key",
        )
        wrong = SwarmDirectory(MODEL, PROTOCOL_VERSION, wrong_key)
        wrong._dht = outsider  # a wrong key's reader on the outsider's daemon finds nothing
        assert wrong.nodes() == {}

        fake = SwarmCredentials.from_key(generate_swarm_key())
        expires = get_dht_time() + TTL_S
        plain = record_of(_info("intruder", "6.6.6.6:1"))
        sealed_wrong = RecordSeal(fake).seal(
            msgpack.packb(record_of(_info(fake.node_id, "6.6.6.6:1"))), TTL_S
        )
        for node_id, value in (("intruder", plain), (fake.node_id, sealed_wrong)):
            assert not outsider.store(key, value, expires, subkey=node_id)  # every member refused
        # A captured record, re-stored to live longer than its signature allows.
        assert not outsider.store(key, stolen, get_dht_time() + 3600, subkey=member.node_id)
        nodes = first.nodes()
        assert set(nodes) == {member.node_id}  # no state changed on the members
        assert nodes[member.node_id][1] <= TTL_S
    finally:
        outsider.shutdown()


def test_a_members_unsigned_or_stale_records_are_ignored(members) -> None:
    first, second, member = members
    seal = RecordSeal(member)
    key = seal.scoped(swarm_key(MODEL))
    payload = msgpack.packb(record_of(_info(member.node_id, "10.0.0.1:1")))
    old = seal.seal(payload, TTL_S)
    time.sleep(0.01)
    assert second.announce(_info(member.node_id, "10.0.0.2:2"), TTL_S)
    assert _wait(lambda: member.node_id in first.nodes(), 10)
    # The replay: an older record, even with a later DHT expiry, is refused and not used.
    raw = second._dht  # hivemind, below the directory
    raw.store(key, old, get_dht_time() + TTL_S + 1, subkey=member.node_id)
    assert first.nodes()[member.node_id][0].address == "10.0.0.2:2"
    unsigned_id = SwarmCredentials.from_key(KEY).node_id
    assert not raw.store(
        key, record_of(_info(unsigned_id, "10.0.0.3:3")), get_dht_time() + 5, subkey=unsigned_id
    )
    assert unsigned_id not in first.nodes()
    assert unsigned_id not in second.nodes()  # nor used by the writer's own reader
