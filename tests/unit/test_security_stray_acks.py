"""The peer acknowledges each message once, in order. A peer that sends acknowledgements
for messages never sent gets one warning per stream, not one log line per stray
acknowledgement (a flood it could write at will)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from molink.transport.channel import SERVICE, method_path
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb
from molink.transport.sender import StreamSender
from tests.helpers.polling import wait_until

STRAY = 50


def _chatty(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[pb.ForwardAck]:
    for _ in requests:
        yield pb.ForwardAck()
        for _ in range(STRAY):
            yield pb.ForwardAck(error="not yours")
        return


def test_stray_acknowledgements_are_logged_once_per_stream(
    caplog: pytest.LogCaptureFixture,
) -> None:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    handler = grpc.stream_stream_rpc_method_handler(
        _chatty, request_deserializer=None, response_serializer=pb.ForwardAck.SerializeToString
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, {"Forward": handler}),)
    )
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    acked = threading.Event()
    sender: StreamSender[pb.ForwardRequest] = StreamSender(
        name="stray-test",
        address=f"127.0.0.1:{port}",
        config=TransportConfig(),
        method=method_path("Forward"),
        ack_type=pb.ForwardAck,
        build=lambda item: item,
        on_failure=lambda item, reason: None,
        on_ack=lambda item, ack: acked.set(),
    )
    try:
        with caplog.at_level(logging.WARNING, logger="molink.transport.sender"):
            sender.put(pb.ForwardRequest(head_id="h"))
            assert acked.wait(10)
            # The stream ends after the stray acks; wait until the sender has read them.
            assert wait_until(lambda: sender._stream is None, 10)
    finally:
        sender.close()
        server.stop(None)
    stray = [r for r in caplog.records if "no message in flight" in r.getMessage()]
    assert len(stray) == 1
