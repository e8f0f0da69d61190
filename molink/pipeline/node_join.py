"""A node's Join call to its initial peer: retried while the peer is unreachable (a head
still loading its weights), up to the join timeout, with a status line on a terminal."""

from __future__ import annotations

import threading
import time

import grpc

from molink.errors import PipelineError
from molink.progress.status import StatusLine
from molink.transport.channel import NodeClient, describe_rpc_error
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb

JOIN_RETRY_S = 0.5


def request_join(
    node_id: str,
    peer: str,
    request: pb.JoinRequest,
    config: TransportConfig,
    stopping: threading.Event,
) -> pb.JoinResponse:
    """``peer``'s answer to ``request``; PipelineError if it cannot be reached in time (or
    the node stops meanwhile)."""
    client = NodeClient(peer, config)
    deadline = time.monotonic() + config.join_timeout_s
    waiting: StatusLine | None = None  # on a terminal: what the join waits for
    try:
        while True:
            try:
                return client.join(request)
            except grpc.RpcError as exc:
                if time.monotonic() > deadline or stopping.is_set():
                    raise PipelineError(
                        f"node {node_id} could not reach {peer} to join: {describe_rpc_error(exc)}"
                    ) from None
                waiting = waiting or StatusLine(f"waiting for {peer} to join its pipeline")
                waiting.update(describe_rpc_error(exc))
                time.sleep(JOIN_RETRY_S)
    finally:
        if waiting is not None:
            waiting.close()
        client.close()
