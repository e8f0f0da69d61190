"""A node that leaves stays gone: in a DHT of more nodes than hold each record, copies of
its last record live on in other nodes' caches and storages until they expire, and each
reading merged them back, so a node that had withdrawn was read as serving for the rest
of its record's lifetime. Its leaving is now itself a record, newer than every copy."""

from __future__ import annotations

import pytest

from molink.config import LayerRange
from molink.discovery.announcer import Announcer
from molink.discovery.dht import SwarmDirectory
from molink.pipeline.identity import NodeInfo
from molink.pipeline.toy import toy_identity
from molink.security.credentials import SwarmCredentials
from molink.security.swarm_key import generate_swarm_key
from molink.transport import PROTOCOL_VERSION
from tests.helpers.polling import wait_until

pytestmark = pytest.mark.integration

MODEL = toy_identity(4)
TTL_S = 60.0  # far longer than the test: a record that stays is not one that expired
DHT_NODES = 8  # more than the 5 replicas hivemind stores each record on


def _ids(directory: SwarmDirectory) -> set[str]:
    return set(directory.nodes())


@pytest.mark.parametrize("sealed", [False, True], ids=["open", "swarm-key"])
def test_a_node_that_left_is_gone_for_every_reader_and_stays_gone(sealed: bool) -> None:
    key = generate_swarm_key() if sealed else None
    credentials = [SwarmCredentials.from_key(key) if key else None for _ in range(DHT_NODES)]
    first = SwarmDirectory(MODEL, PROTOCOL_VERSION, credentials[0]).start("127.0.0.1", [])
    directories = [first] + [
        SwarmDirectory(MODEL, PROTOCOL_VERSION, c).start("127.0.0.1", [first.address])
        for c in credentials[1:]
    ]
    node_id = credentials[1].node_id if credentials[1] else "s1"
    try:
        info = NodeInfo(
            node_id,
            MODEL,
            LayerRange(2, 4),
            "127.0.0.1:5",
            10,
            16,
            protocol_version=PROTOCOL_VERSION,
        )
        announcer = Announcer(directories[1], lambda: info, TTL_S).start()
        assert wait_until(lambda: all(node_id in _ids(d) for d in directories), 20)
        announcer.stop()
        assert wait_until(lambda: not any(node_id in _ids(d) for d in directories), 10)
        for _ in range(3):  # and no reading brings it back
            assert not any(node_id in _ids(d) for d in directories)
        back = NodeInfo(
            node_id,
            MODEL,
            LayerRange(1, 4),
            "127.0.0.1:7",
            10,
            16,
            protocol_version=PROTOCOL_VERSION,
        )
        # It comes back, with another span and a shorter lifetime: its leaving record,
        # which expires later, must not keep the DHT from storing its new records.
        assert directories[1].announce(back, TTL_S / 6)
        assert wait_until(
            lambda: all(d.nodes().get(node_id, (None,))[0] == back for d in directories), 10
        )
    finally:
        for directory in reversed(directories):
            directory.shutdown()
