"""Sealed DHT records: members read each other's; a wrong key, an unsigned or foreign
record, a replay and an overlong store are refused, by the reader and by the DHT hook."""

from __future__ import annotations

import dataclasses
import time

import msgpack
from hivemind.dht.validation import DHTRecord

from molink.security.credentials import SwarmCredentials
from molink.security.dht_validator import SealedRecordValidator
from molink.security.sealing import RecordSeal
from molink.security.swarm_key import generate_swarm_key

KEY = generate_swarm_key()
MEMBER = SwarmCredentials.from_key(KEY)
NOW = 1_000_000.0


class Clock:
    now = NOW

    def __call__(self) -> float:
        return self.now


def _stored(sealed: object, node_id: str, expiration: float) -> DHTRecord:
    return DHTRecord(b"k", msgpack.packb(node_id), msgpack.packb(sealed), expiration)


def test_members_open_each_others_records_and_outsiders_see_only_noise() -> None:
    reader = RecordSeal(SwarmCredentials.from_key(KEY), clock=Clock())
    sealed = RecordSeal(MEMBER).seal(b"address 10.0.0.7:50051", ttl_s=30, now=NOW)
    record, reason = reader.open(sealed, MEMBER.node_id)
    assert (record.payload, reason) == (b"address 10.0.0.7:50051", "")
    assert b"10.0.0.7" not in sealed  # the topology is not readable without the key
    outsider = RecordSeal(SwarmCredentials.from_key(generate_swarm_key()), clock=Clock())
    assert outsider.open(sealed, MEMBER.node_id) == (None, "not sealed with this swarm's key")
    assert outsider.scoped("molink/m/nodes") != reader.scoped("molink/m/nodes")
    assert RecordSeal(MEMBER).scoped("x") == reader.scoped("x")  # same key, same namespace


def test_unsigned_foreign_impostor_and_tampered_records_are_refused() -> None:
    reader = RecordSeal(SwarmCredentials.from_key(KEY), clock=Clock())
    assert "unsigned" in reader.open({"node_id": MEMBER.node_id}, MEMBER.node_id)[1]
    assert "unsigned" in reader.open(b"plain bytes", MEMBER.node_id)[1]
    # Someone who learnt the sealing key but signs with a certificate of another authority.
    stranger = SwarmCredentials.from_key(generate_swarm_key())
    authority = dataclasses.replace(
        stranger.authority,
        sealing_key=MEMBER.authority.sealing_key,
        namespace=MEMBER.authority.namespace,
    )
    forged = RecordSeal(SwarmCredentials(authority, stranger.identity)).seal(b"x", 30, now=NOW)
    assert "non-member" in reader.open(forged, stranger.node_id)[1]
    sealed = RecordSeal(MEMBER).seal(b"x", 30, now=NOW)
    assert "another node" in reader.open(sealed, "someone-else")[1]
    flipped = sealed[:-1] + bytes([sealed[-1] ^ 1])
    assert reader.open(flipped, MEMBER.node_id) == (None, "not sealed with this swarm's key")


def test_expired_and_replayed_records_are_refused() -> None:
    clock = Clock()
    reader = RecordSeal(SwarmCredentials.from_key(KEY), clock=clock)
    seal = RecordSeal(MEMBER)
    old = seal.seal(b"old", 30, now=NOW)
    clock.now += 10
    new = seal.seal(b"new", 30, now=clock.now)
    assert reader.open(new, MEMBER.node_id)[1] == ""
    assert "replayed" in reader.open(old, MEMBER.node_id)[1]
    clock.now += 31
    assert "expired" in reader.open(new, MEMBER.node_id)[1]


def test_the_dht_hook_stores_only_members_records_under_their_own_id() -> None:
    validator = SealedRecordValidator(RecordSeal(SwarmCredentials.from_key(KEY)))
    sealed = RecordSeal(MEMBER).seal(b"x", ttl_s=30)
    now = time.time()
    assert validator.validate(_stored(sealed, MEMBER.node_id, now + 30))
    assert not validator.validate(_stored(sealed, "someone-else", now + 30))
    assert not validator.validate(_stored(sealed, MEMBER.node_id, now + 3600))  # kept too long
    assert not validator.validate(_stored({"node_id": MEMBER.node_id}, MEMBER.node_id, now + 30))
    outsider = RecordSeal(SwarmCredentials.from_key(generate_swarm_key())).seal(b"x", 30)
    assert not validator.validate(_stored(outsider, MEMBER.node_id, now + 30))
    assert not validator.validate(DHTRecord(b"k", b"\xc1", b"\xc1", now + 30))  # garbage
    assert not validator.validate(_stored(b"MLS1" + b"\0" * 100_000, MEMBER.node_id, now + 30))


def test_the_dht_hook_refuses_a_store_whose_expiry_is_not_a_number() -> None:
    # The store's expiry travels beside the signed record, so anyone can replay a valid
    # record with an expiry of NaN: it compares false with every time, so the check
    # against the signed expiry passed, and hivemind's storage would never expire it.
    validator = SealedRecordValidator(RecordSeal(SwarmCredentials.from_key(KEY)))
    sealed = RecordSeal(MEMBER).seal(b"x", ttl_s=30)
    assert validator.validate(_stored(sealed, MEMBER.node_id, time.time() + 30))
    assert not validator.validate(_stored(sealed, MEMBER.node_id, float("nan")))
    assert not validator.validate(_stored(sealed, MEMBER.node_id, float("inf")))
