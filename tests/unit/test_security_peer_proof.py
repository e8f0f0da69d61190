"""A stream or a call to a node id reaches that node: the member listening at the address must prove
it holds the id's key (molink.security.peer_proof); any other member's certificate, valid
as it is, is refused before anything is sent."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from molink.config import LayerRange
from molink.pipeline import StageNode
from molink.pipeline.status import pipeline_status
from molink.pipeline.toy import ToyStageExecutor
from molink.pipeline.wire import node_to_proto
from molink.security.credentials import SwarmCredentials
from molink.transport.channel import NodeClient, PeerIdentityError, method_path
from molink.transport.generated import molink_pb2 as pb
from molink.transport.sender import StreamSender
from tests.helpers.polling import wait_until
from tests.unit.test_security_authorization import KEY, MODEL, _info, member, running_swarm


@pytest.fixture
def listener() -> Iterator[StageNode]:
    """A swarm member serving on loopback, in no pipeline."""
    config = member()
    node = StageNode(ToyStageExecutor(LayerRange(2, 4), MODEL), _info(config, 2, 4), config)
    node.start()
    try:
        yield node
    finally:
        node.stop()


def _send(address: str, expected_node_id: str) -> tuple[list[pb.ForwardAck], list[str]]:
    """One Forward message from a member, to ``expected_node_id`` at ``address``: the acks
    and the failure reasons that came back."""
    acks: list[pb.ForwardAck] = []
    failures: list[str] = []
    done = threading.Event()
    sender = StreamSender(
        name="proof-test",
        address=address,
        config=member(),
        method=method_path("Forward"),
        ack_type=pb.ForwardAck,
        build=lambda item: item,
        on_failure=lambda item, reason: (failures.append(reason), done.set()),
        on_ack=lambda item, ack: (acks.append(ack), done.set()),
        expected_node_id=expected_node_id,
    )
    try:
        sender.put(pb.ForwardRequest(head_id="h", sender_id="s"))
        assert done.wait(30), "neither an ack nor a failure came back"
    finally:
        sender.close()
    return acks, failures


def test_a_stream_reaches_the_node_it_names(listener: StageNode) -> None:
    acks, failures = _send(listener.address, listener.node_id)
    assert failures == [] and len(acks) == 1
    assert wait_until(lambda: listener.bytes_received > 0)


def test_another_members_certificate_at_the_address_is_refused(listener: StageNode) -> None:
    expected = SwarmCredentials.from_key(KEY)  # a member of the same swarm, elsewhere
    acks, failures = _send(listener.address, expected.node_id)
    assert acks == []
    (reason,) = failures
    assert f"is not node {expected.node_id}" in reason
    assert f"it proved to be node {listener.node_id}" in reason
    assert listener.bytes_received == 0  # nothing was sent to the impostor


def test_a_call_answered_by_another_member_is_refused(listener: StageNode) -> None:
    expected = SwarmCredentials.from_key(KEY)
    client = NodeClient(listener.address, member(), expected.node_id)
    try:
        with pytest.raises(PeerIdentityError) as caught:
            client.health()
        assert f"is not node {expected.node_id}" in str(caught.value)
        assert f"it proved to be node {listener.node_id}" in str(caught.value)
    finally:
        client.close()
    client = NodeClient(listener.address, member(), listener.node_id)
    try:
        assert "not part of any pipeline" in client.health().message  # it answered
    finally:
        client.close()


def test_a_member_that_joins_at_another_members_address_is_dropped() -> None:
    """A member joins under its own id (as it must) but advertises the address of another
    member: calls to it reach that other member, which cannot prove the id, so the head's
    health checks fail and the head drops it; ``molink status`` says why."""
    with running_swarm() as swarm:
        rogue_id = swarm.rogue.security.node_id
        impostor = node_to_proto(_info(swarm.rogue, 2, 4).with_address(swarm.last.address))
        channel, stub = swarm.stub(swarm.head.address)
        with channel:
            assert stub.Join(pb.JoinRequest(node=impostor), timeout=10).accepted
        table = pipeline_status(swarm.head.address, swarm.head.config)
        assert f"is not node {rogue_id}: it proved to be node {swarm.last.node_id}" in table
        assert wait_until(lambda: rogue_id not in [s.node_id for s in swarm.head.pipeline().stages])
        assert swarm.last.node_id in [s.node_id for s in swarm.head.pipeline().stages]
