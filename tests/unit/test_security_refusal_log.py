"""Refusals are logged at a bounded rate per peer and as bounded, printable text: they
quote what the peer sent (ids, routes, errors), and a peer could otherwise write lines
of any length with terminal escapes, or one line per garbage message it sends."""

from __future__ import annotations

import logging

import grpc
import pytest

from molink.security.limits import RefusalLog
from molink.security.peer_text import MAX_PEER_TEXT_CHARS
from molink.transport.channel import method_path
from molink.transport.generated import molink_pb2 as pb
from tests.helpers.toy_swarm import toy_swarm


def test_a_refusal_line_is_bounded_and_printable(caplog: pytest.LogCaptureFixture) -> None:
    log = RefusalLog(logging.getLogger("refusals-test"))
    with caplog.at_level(logging.WARNING, logger="refusals-test"):
        log.refused("peer", "refused node \x1b]0;owned\x07" + "x" * 100_000)
    (record,) = caplog.records
    line = record.getMessage()
    assert len(line) <= MAX_PEER_TEXT_CHARS + 40
    assert line.isprintable()


def test_garbage_forward_messages_are_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with toy_swarm((("n", 1, 4),)) as swarm:
        stage = swarm.nodes["n"]
        with grpc.insecure_channel(stage.address) as channel:
            forward = channel.stream_stream(
                method_path("Forward"),
                request_serializer=None,
                response_deserializer=pb.ForwardAck.FromString,
            )
            with caplog.at_level(logging.WARNING):
                acks = list(forward(iter([b"\xff\xff\xff"] * 5), timeout=10))
        assert len(acks) == 5 and all("cannot parse" in ack.error for ack in acks)
        lines = [r for r in caplog.records if "cannot parse" in r.getMessage()]
        assert len(lines) == 1
