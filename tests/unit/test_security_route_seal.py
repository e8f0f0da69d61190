"""A stage takes a route from a caller other than the head only with the head's signature
of it (molink.security.route_seal): the sender writes the route, so a member in no
pipeline could otherwise name itself the node before a stage and release or step into
another head's sequences. Stages and head are threads of this process, all members of one
swarm (the fixture of test_security_authorization)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator

import pytest
import torch
from cryptography.hazmat.primitives import serialization

from molink.pipeline.toy import expected_token
from molink.pipeline.wire import route_from_proto, route_to_proto
from molink.placement.route import Route, RouteHop, RouteSeal
from molink.security.identity import NodeIdentity
from molink.security.route_seal import SEAL_VERSION, RouteSigner, RouteVerifier, signed_bytes
from molink.transport.codec import encode_tensor
from molink.transport.convert import plan_to_proto
from molink.transport.generated import molink_pb2 as pb
from tests.helpers.polling import first_result
from tests.unit.test_security_authorization import MODEL, Swarm, _prefill, running_swarm


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    with running_swarm() as running:
        yield running


def _route(head: str, middle: str, last: str) -> Route:
    return Route(
        (
            RouteHop(head, "127.0.0.1:1", 0, 1),
            RouteHop(middle, "127.0.0.1:2", 1, 2),
            RouteHop(last, "127.0.0.1:3", 2, 4),
        ),
        "127.0.0.1:1",
    )


def test_a_seal_holds_only_for_the_route_its_head_signed() -> None:
    head = NodeIdentity.generate()
    other = NodeIdentity.generate()
    signer = RouteSigner(head)
    route = _route(head.node_id, "m", "l")
    verifier = RouteVerifier()
    sealed = route_from_proto(route_to_proto(signer.sealed(route)))  # through the wire
    assert sealed == route and sealed.seal is not None and sealed.seal.version == SEAL_VERSION
    assert verifier.problem(sealed) is None
    assert "carries no signature" in (verifier.problem(route) or "")
    for changed in (
        dataclasses.replace(
            route, hops=(route.hops[0], RouteHop("x", "127.0.0.1:2", 1, 2), route.hops[2])
        ),
        dataclasses.replace(route, hops=(*route.hops[:2], RouteHop("l", "10.0.0.9:3", 2, 4))),
        dataclasses.replace(route, head_address="10.0.0.9:1"),
    ):
        tampered = Route(changed.hops, changed.head_address, sealed.seal)
        assert "does not match" in (verifier.problem(tampered) or "")
    foreign = RouteSigner(other).sealed(_route(other.node_id, "m", "l")).seal
    assert "not by its head" in (
        verifier.problem(Route(route.hops, route.head_address, foreign)) or ""
    )
    bad_version = dataclasses.replace(sealed.seal, version=SEAL_VERSION + 1)
    assert "seal version" in (
        verifier.problem(Route(route.hops, route.head_address, bad_version)) or ""
    )
    junk_key = dataclasses.replace(sealed.seal, public_key=b"junk")
    assert "cannot be read" in (
        verifier.problem(Route(route.hops, route.head_address, junk_key)) or ""
    )


def test_signing_and_verifying_run_once_per_distinct_route() -> None:
    head = NodeIdentity.generate()
    signer = RouteSigner(head, cache_size=2)
    verifier = RouteVerifier(cache_size=2)
    routes = [_route(head.node_id, m, "l") for m in ("a", "b", "c")]
    for _ in range(3):
        for route in routes[:2]:
            assert verifier.problem(signer.sealed(route)) is None
    assert signer.signatures_made == 2 and verifier.verifications == 2
    for route in (routes[2], routes[0]):  # the third pushed the first out of both caches
        assert verifier.problem(signer.sealed(route)) is None
    assert signer.signatures_made == 4 and verifier.verifications == 4
    assert verifier.problem(Route(routes[0].hops, "elsewhere", signer.seal(routes[0])))
    assert verifier.verifications == 5  # a failure is checked again each time, never kept
    assert "signs only its own routes" in str(_raises(lambda: signer.seal(_route("x", "a", "l"))))


def test_the_canonical_bytes_name_every_field_unambiguously() -> None:
    one = Route((RouteHop("ab", "c", 0, 1), RouteHop("d", "e", 1, 2)), "h")
    two = Route((RouteHop("a", "bc", 0, 1), RouteHop("d", "e", 1, 2)), "h")
    assert signed_bytes(one) != signed_bytes(two)
    assert signed_bytes(one).startswith(b"\x00\x00\x00\x11molink-route-seal\x00\x00\x00\x01")


def _raises(call) -> Exception:
    try:
        call()
    except Exception as exc:  # noqa: BLE001 (returned to the assertion)
        return exc
    raise AssertionError("no exception")


def _send(swarm: Swarm, route: Route, seq_id: int, kind: str) -> pb.ForwardAck:
    """One Forward message from the rogue member, carrying ``route`` as it is."""
    request = pb.ForwardRequest(head_id=swarm.head.head_id, sender_id="x")
    request.route.CopyFrom(route_to_proto(route))
    if kind == "release":
        request.release.CopyFrom(pb.ReleaseRequest(head_id=swarm.head.head_id, seq_ids=[seq_id]))
    else:
        plan = _prefill(9, seq_id, (1, 2))
        request.step.plan.CopyFrom(plan_to_proto(plan, include_token_ids=False))
        request.step.hidden.CopyFrom(encode_tensor(torch.zeros(2, MODEL.hidden_size), "float32"))
    channel, stub = swarm.stub(swarm.last.address)
    with channel:
        (ack,) = stub.Forward(iter([request]), timeout=5)
    return ack


def _with_rogue(swarm: Swarm) -> Route:
    """The head's route with the rogue member in the middle's place, unsigned."""
    real = swarm.head.routes.route_for_new(2)
    hops = list(real.hops)
    hops[1] = dataclasses.replace(hops[1], node_id=swarm.rogue.security.node_id)
    return Route(tuple(hops), real.head_address)


def _assert_untouched(swarm: Swarm, acks: list[pb.ForwardAck], reason: str) -> None:
    for ack in acks:
        assert "refused a forward message" in ack.error and reason in ack.error, ack.error
    time.sleep(0.5)
    health = swarm.last.health()
    assert health.active_sequences == 1
    assert health.steps_processed == 1  # the head's one step, nothing of the rogue's


def test_a_member_in_no_pipeline_cannot_forge_a_route_to_release_or_step(swarm) -> None:
    swarm.head.submit(_prefill(1, 5, (10,)))
    assert first_result(swarm.head).error is None
    assert swarm.last.health().active_sequences == 1
    forged = _with_rogue(swarm)
    acks = [_send(swarm, forged, 5, "release"), _send(swarm, forged, 6, "step")]
    _assert_untouched(swarm, acks, "carries no signature of its head")


def test_a_tampered_signed_route_is_refused(swarm) -> None:
    swarm.head.submit(_prefill(1, 5, (10,)))
    assert first_result(swarm.head).error is None
    signed = swarm.head.node.route_signer.sealed(swarm.head.routes.route_for_new(2))
    forged = _with_rogue(swarm)
    tampered = Route(
        forged.hops, forged.head_address, signed.seal
    )  # the head's seal, a hop changed
    acks = [_send(swarm, tampered, 5, "release"), _send(swarm, tampered, 6, "step")]
    _assert_untouched(swarm, acks, "signature does not match the route")


def test_a_route_signed_by_another_node_is_refused(swarm) -> None:
    swarm.head.submit(_prefill(1, 5, (10,)))
    assert first_result(swarm.head).error is None
    forged = _with_rogue(swarm)
    identity = swarm.rogue.security.identity  # a valid signature of the route, by the rogue
    der = identity.private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    rogue_seal = RouteSeal(SEAL_VERSION, der, identity.sign(signed_bytes(forged)))
    acks = [_send(swarm, Route(forged.hops, forged.head_address, rogue_seal), 5, "release")]
    _assert_untouched(
        swarm, acks, f"signed by node {swarm.rogue.security.node_id}, not by its head"
    )


def test_an_honest_pipeline_signs_once_and_each_stage_verifies_once(swarm) -> None:
    for step, (seq_id, token) in enumerate(((5, 10), (6, 11), (7, 12)), start=1):
        swarm.head.submit(_prefill(step, seq_id, (token,)))
        result = first_result(swarm.head)
        assert result.error is None
        assert result.sampled[0].token_id == expected_token(token, seq_id, 4)
    assert swarm.head.node.route_signer.signatures_made == 1
    assert swarm.last.route_verifier.verifications == 1  # the middle passes the seal on
    assert swarm.middle.route_verifier.verifications == 0  # its caller is the head
