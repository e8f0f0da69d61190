"""Signed records: accepted from members for their own id, refused unsigned, from
outsiders or impostors, tampered, expired, from the future, or replayed."""

from __future__ import annotations

import dataclasses

from molink.security.authority import SwarmAuthority
from molink.security.identity import NodeIdentity
from molink.security.records import RecordVerifier, sign_record
from molink.security.swarm_key import generate_swarm_key

AUTHORITY = SwarmAuthority.from_key(generate_swarm_key())


class Clock:
    now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_a_members_record_is_accepted_once_fresh_and_replays_are_not() -> None:
    clock = Clock()
    verifier = RecordVerifier(AUTHORITY, clock=clock)
    node = NodeIdentity.generate(AUTHORITY)
    first = sign_record(node, b"span 0-12", ttl_s=30, now=clock.now)
    assert verifier.check(first, node.node_id) is None
    clock.now += 10
    second = sign_record(node, b"span 0-12 renewed", ttl_s=30, now=clock.now)
    assert verifier.check(second, node.node_id) is None
    assert verifier.check(second, node.node_id) is None  # the same record seen twice is fine
    assert "replayed" in verifier.check(first, node.node_id)
    clock.now += 31
    assert "expired" in verifier.check(second, node.node_id)


def test_records_that_prove_nothing_are_refused() -> None:
    clock = Clock()
    verifier = RecordVerifier(AUTHORITY, clock=clock)
    node = NodeIdentity.generate(AUTHORITY)
    record = sign_record(node, b"payload", ttl_s=30, now=clock.now)
    assert verifier.check(None, node.node_id) == "unsigned"
    assert verifier.check(dataclasses.replace(record, signature=b""), node.node_id) == "unsigned"
    assert "another node" in verifier.check(record, NodeIdentity.generate(AUTHORITY).node_id)
    tampered = dataclasses.replace(record, payload=b"payload, changed")
    assert verifier.check(tampered, node.node_id) == "bad signature"
    stretched = dataclasses.replace(record, expires_at=record.expires_at + 3600)
    assert verifier.check(stretched, node.node_id) == "bad signature"
    outsider = NodeIdentity.generate(SwarmAuthority.from_key(generate_swarm_key()))
    foreign = sign_record(outsider, b"payload", ttl_s=30, now=clock.now)
    assert "non-member" in verifier.check(foreign, outsider.node_id)
    garbage = dataclasses.replace(record, certificate=b"\x30\x03junk")
    assert "cannot be parsed" in verifier.check(garbage, node.node_id)
    future = sign_record(node, b"payload", ttl_s=30, now=clock.now + 3600)
    assert verifier.check(future, node.node_id) == "issued in the future"


def test_a_non_finite_time_signed_by_a_member_is_refused_naming_the_field() -> None:
    """A NaN issue time compares false with everything: accepted, it became the node's
    newest, and every replay of that node's older records passed the replay check."""
    clock = Clock()
    verifier = RecordVerifier(AUTHORITY, clock=clock)
    node = NodeIdentity.generate(AUTHORITY)
    old = sign_record(node, b"span 0-12", ttl_s=30, now=clock.now)
    assert verifier.check(old, node.node_id) is None
    clock.now += 10
    renewed = sign_record(node, b"span 0-12 renewed", ttl_s=30, now=clock.now)
    assert verifier.check(renewed, node.node_id) is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        issued = sign_record(node, b"span 0-12", ttl_s=30, now=bad)
        reason = verifier.check(issued, node.node_id)
        assert reason is not None and "issued_at" in reason and "finite" in reason, reason
    assert "replayed" in verifier.check(old, node.node_id)  # the replay check still holds
    for bad in (float("nan"), float("inf")):
        forever = sign_record(node, b"span 0-12", ttl_s=bad, now=clock.now)
        reason = verifier.check(forever, node.node_id)
        assert reason is not None and "expires_at" in reason and "finite" in reason, reason
