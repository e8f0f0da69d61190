"""gRPC channels, servers and a small client for the unary calls of the node service.

Message size limits are set explicitly on both ends (gRPC's default receive limit is
4 MiB, far below one prefill's activations). Keepalives notice a peer that vanished
without closing its connection; short reconnect backoffs let a restarted peer be reached
again within seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from molink.security.peer_proof import NONCE_KEY, PeerProver, new_nonce, proof_problem
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb
from molink.transport.generated import molink_pb2_grpc as pb_grpc
from molink.transport.validate import release_chunks


def _size_options(config: TransportConfig) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", config.max_message_bytes),
        ("grpc.max_receive_message_length", config.max_message_bytes),
    ]


def channel_options(config: TransportConfig) -> list[tuple[str, int]]:
    return _size_options(config) + [
        # Each channel connects on its own: by default channels to one address share
        # gRPC's subchannels, so a channel made fresh for a node restarted there would
        # inherit the reconnect backoff of a stale one still open and fail at once.
        ("grpc.use_local_subchannel_pool", 1),
        ("grpc.keepalive_time_ms", 10_000),
        ("grpc.keepalive_timeout_ms", 5_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.min_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 2_000),
    ]


def server_options(config: TransportConfig) -> list[tuple[str, int]]:
    return _size_options(config) + [
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
        # Without this a second server could silently bind the same port.
        ("grpc.so_reuseport", 0),
    ]


def make_channel(
    address: str, config: TransportConfig, max_receive_bytes: int | None = None
) -> grpc.Channel:
    """Mutual TLS with the swarm's authority when the config has credentials, else plaintext.
    ``max_receive_bytes``: a lower receive limit than ``config.max_message_bytes``, for a
    channel whose answers are all small."""
    options = channel_options(config)
    if max_receive_bytes is not None:
        options = [o for o in options if o[0] != "grpc.max_receive_message_length"]
        options.append(("grpc.max_receive_message_length", max_receive_bytes))
    if config.security is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(
        address,
        config.security.channel_credentials(),
        options=options + config.security.channel_options(),
    )


def add_server_port(server: grpc.Server, address: str, config: TransportConfig) -> int:
    """Bind ``address`` (mutual TLS when the config has credentials); 0 when it failed."""
    if config.security is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, config.security.server_credentials())


def make_server(config: TransportConfig) -> grpc.Server:
    return grpc.server(
        futures.ThreadPoolExecutor(
            max_workers=config.server_workers, thread_name_prefix="molink-grpc"
        ),
        options=server_options(config),
        maximum_concurrent_rpcs=config.server_workers,
    )


SERVICE = pb.DESCRIPTOR.services_by_name["MolinkNode"]


def method_path(name: str) -> str:
    """The HTTP/2 path of a MolinkNode method, e.g. ``/molink.v1.MolinkNode/Forward``."""
    return f"/{SERVICE.full_name}/{SERVICE.methods_by_name[name].name}"


def add_node_service(
    servicer: pb_grpc.MolinkNodeServicer,
    server: grpc.Server,
    raw_requests: frozenset[str] = frozenset(),
    prover: PeerProver | None = None,
) -> None:
    """Register ``servicer`` like the generated code does, except that the methods named in
    ``raw_requests`` get the request as bytes: the servicer parses it once and knows its
    exact size without serializing it again. With a ``prover`` (a swarm member), every
    call that asks for it first gets the proof of this node's id
    (molink.security.peer_proof)."""
    handlers = {}
    for method in SERVICE.methods:
        request_type = getattr(pb, method.input_type.name)
        response_type = getattr(pb, method.output_type.name)
        make = _HANDLER_FACTORIES[(method.client_streaming, method.server_streaming)]
        behavior = getattr(servicer, method.name)
        handlers[method.name] = make(
            behavior if prover is None else _proving(behavior, prover),
            request_deserializer=None if method.name in raw_requests else request_type.FromString,
            response_serializer=response_type.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)


def _proving(behavior: Callable[[Any, Any], Any], prover: PeerProver) -> Callable[[Any, Any], Any]:
    def proving(request: Any, context: grpc.ServicerContext) -> Any:
        prover.answer(context)
        return behavior(request, context)

    return proving


_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class PeerIdentityError(grpc.RpcError):
    """The peer that answered did not prove to be the node the caller expected."""


def describe_rpc_error(exc: grpc.RpcError) -> str:
    """``CODE: details`` of a failed call, for messages that name what went wrong."""
    if isinstance(exc, PeerIdentityError):
        return f"UNAUTHENTICATED: {exc}"
    # A failed call is also a grpc.Call (code and details); other RpcErrors carry a message.
    code = exc.code() if isinstance(exc, grpc.Call) else None
    details = exc.details() if isinstance(exc, grpc.Call) else str(exc)
    return f"{code.name if code is not None else 'UNKNOWN'}: {details}"


def call_metadata() -> tuple[tuple[str, str | bytes], ...]:
    """Metadata attached to every call. A caller's identity is not among it: in a swarm it
    is the certificate proven in the TLS handshake (molink.security)."""
    return ()


class NodeClient:
    """Unary calls to one node, each bounded by ``config.rpc_timeout_s`` unless told.

    With ``expected_node_id`` in a swarm, every answer must come with the proof that the
    peer at ``address`` is that node (molink.security.peer_proof), else the call raises
    PeerIdentityError; without one, any member there may answer."""

    def __init__(
        self,
        address: str,
        config: TransportConfig,
        expected_node_id: str | None = None,
        max_receive_bytes: int | None = None,
    ) -> None:
        self.address = address
        self._config = config
        self.expected_node_id = expected_node_id if config.security is not None else None
        self._channel = make_channel(address, config, max_receive_bytes)
        self.stub = pb_grpc.MolinkNodeStub(self._channel)

    def _timeout(self, timeout: float | None) -> float:
        return self._config.rpc_timeout_s if timeout is None else timeout

    def proof_request(self) -> tuple[tuple[tuple[str, str | bytes], ...], bytes]:
        """The metadata of one call, and the nonce its answer must prove."""
        nonce = new_nonce()
        if self.expected_node_id is None:
            return call_metadata(), nonce
        return (*call_metadata(), (NONCE_KEY, nonce)), nonce

    def check_proof(self, call: grpc.Call, nonce: bytes) -> None:
        """Raises PeerIdentityError unless ``call`` (answered) proves the expected node."""
        if self.expected_node_id is None:
            return
        assert self._config.security is not None
        problem = proof_problem(
            call.initial_metadata(), nonce, self._config.security.node_id, self.expected_node_id
        )
        if problem is not None:
            raise PeerIdentityError(
                f"the peer at {self.address} is not node {self.expected_node_id}: {problem}"
            )

    def _unary(
        self, method: grpc.UnaryUnaryMultiCallable, request: Any, timeout: float | None
    ) -> Any:
        metadata, nonce = self.proof_request()
        response, call = method.with_call(
            request, timeout=self._timeout(timeout), metadata=metadata
        )
        self.check_proof(call, nonce)
        return response

    def describe(self, timeout: float | None = None) -> pb.NodeInfo:
        return self._unary(self.stub.Describe, pb.DescribeRequest(), timeout)

    def join(self, request: pb.JoinRequest, timeout: float | None = None) -> pb.JoinResponse:
        return self._unary(self.stub.Join, request, timeout)

    def get_pipeline(self, timeout: float | None = None) -> pb.Pipeline:
        return self._unary(self.stub.GetPipeline, pb.GetPipelineRequest(), timeout)

    def update_pipeline(
        self, pipeline: pb.Pipeline, timeout: float | None = None
    ) -> pb.UpdatePipelineResponse:
        return self._unary(self.stub.UpdatePipeline, pipeline, timeout)

    def release(
        self,
        head_id: str,
        seq_ids: list[int],
        timeout: float | None = None,
        started_before_step: int | None = None,
    ) -> int:
        """Free ``seq_ids`` of ``head_id`` (with ``started_before_step``: only copies a
        plan of an earlier step started). Sent in chunks a stage of a smaller
        max_sequences_per_head than this node's still accepts."""
        released = 0
        for chunk in release_chunks(seq_ids):
            request = pb.ReleaseRequest(head_id=head_id, seq_ids=chunk)
            if started_before_step is not None:
                request.started_before_step = started_before_step
            released += self._unary(self.stub.Release, request, timeout).num_released
        return released

    def witness(
        self, request: pb.WitnessRequest, timeout: float | None = None
    ) -> pb.WitnessResponse:
        return self._unary(self.stub.Witness, request, timeout)

    def health(self, timeout: float | None = None) -> pb.HealthResponse:
        return self._unary(self.stub.Health, pb.HealthRequest(), timeout)

    def close(self) -> None:
        self._channel.close()
