"""A member's directory reads only sealed, signed, fresh records of members, and says in
the log why it ignores any other (hivemind replaced by a dictionary)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import pytest

from molink.config import LayerRange
from molink.discovery.dht import SwarmDirectory
from molink.discovery.records import record_of
from molink.pipeline.identity import NodeInfo
from molink.pipeline.toy import toy_identity
from molink.security.credentials import SwarmCredentials
from molink.security.sealing import RecordSeal
from molink.security.swarm_key import generate_swarm_key
from molink.transport import PROTOCOL_VERSION
from tests.helpers.dht_answers import answered

MODEL = toy_identity(4)
KEY = generate_swarm_key()


@dataclass
class Entry:
    value: object
    expiration_time: float


@dataclass
class Found:
    value: dict


class FakeDht:
    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}

    def get(self, key: str, latest: bool, return_future: bool = False) -> Any:
        return answered(Found(dict(self.entries)), return_future)


def _directory() -> tuple[SwarmDirectory, FakeDht]:
    directory = SwarmDirectory(MODEL, PROTOCOL_VERSION, SwarmCredentials.from_key(KEY))
    fake = FakeDht()
    directory._dht = fake
    return directory, fake


def _sealed(credentials: SwarmCredentials, address: str, now: float | None = None) -> bytes:
    info = NodeInfo(credentials.node_id, MODEL, LayerRange(2, 4), address, 10, 16)
    return RecordSeal(credentials).seal(msgpack.packb(record_of(info)), 30, now=now)


def test_members_records_are_read_and_others_ignored_with_the_reason(caplog) -> None:
    directory, fake = _directory()
    member, impostor = SwarmCredentials.from_key(KEY), SwarmCredentials.from_key(KEY)
    outsider = SwarmCredentials.from_key(generate_swarm_key())
    plain = NodeInfo("plain", MODEL, LayerRange(2, 4), "10.0.0.4:4", 10, 16)
    expiry = time.time() + 30
    fake.entries = {
        member.node_id: Entry(_sealed(member, "10.0.0.1:1"), expiry),
        "plain": Entry(record_of(plain), expiry),
        outsider.node_id: Entry(_sealed(outsider, "10.0.0.2:2"), expiry),
        "victim": Entry(_sealed(impostor, "10.0.0.3:3"), expiry),
    }
    with caplog.at_level(logging.WARNING):
        nodes = directory.nodes()
    assert list(nodes) == [member.node_id]
    assert nodes[member.node_id][0].address == "10.0.0.1:1"
    assert "ignoring the DHT record of node plain: unsigned" in caplog.text
    assert f"node {outsider.node_id}: not sealed with this swarm's key" in caplog.text
    assert "node victim: signed by another node than victim" in caplog.text


@pytest.mark.parametrize("age_s", [0.5, 45.0])
def test_replayed_and_expired_records_are_ignored(caplog, age_s: float) -> None:
    directory, fake = _directory()
    member = SwarmCredentials.from_key(KEY)
    now = time.time()
    old = _sealed(member, "10.0.0.1:1", now=now - age_s)
    fake.entries = {member.node_id: Entry(_sealed(member, "10.0.0.2:2", now=now), now + 30)}
    assert directory.nodes()[member.node_id][0].address == "10.0.0.2:2"
    fake.entries = {member.node_id: Entry(old, now + 30)}
    with caplog.at_level(logging.WARNING):
        assert directory.nodes() == {}
    assert ("replayed" if age_s < 30 else "expired") in caplog.text
