"""In-order streaming of messages to one peer, on a thread of its own.

``put`` never blocks, so the compute thread hands over its output and moves on while the
bytes drain over a slow link. Messages are encoded on the sending side (``build``), not by
the caller, for the same reason.

The peer acknowledges every message, in order. When the stream breaks, every message not
yet acknowledged, and every one still queued, is handed to ``on_failure`` with the reason;
the next ``put`` opens a fresh stream. That bounds how long a message can sit behind a
dead peer: until gRPC notices the broken connection (at once for a closed port, within
the keepalive timeout for a vanished host).

An optional ``DeliveryObserver`` sees, per acknowledged message, its size, when it was
handed to the transport and when its acknowledgement came back: what the pipeline needs
to estimate the link's round trip and bandwidth without probing it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

import grpc
from google.protobuf.message import Message

from molink.security.peer_proof import NONCE_KEY, new_nonce, proof_problem
from molink.transport.channel import call_metadata, describe_rpc_error, make_channel
from molink.transport.config import TransportConfig

logger = logging.getLogger(__name__)

T = TypeVar("T")

_WAIT_SLICE_S = 0.25  # how often a waiting request generator re-checks for shutdown


class _NotTheExpectedNode(Exception):
    """The peer at the address did not prove to be the node the sender was made for."""


class DeliveryObserver(Protocol):
    def observe(self, num_bytes: int, sent_at: float, acked_at: float) -> None:
        """One message acknowledged; times are ``time.monotonic()`` seconds. Called in
        stream order, on the sender's acknowledgement thread."""


class _Pending(Generic[T]):
    """An item in flight; compared by identity."""

    __slots__ = ("item", "num_bytes", "sent_at")

    def __init__(self, item: T) -> None:
        self.item = item
        self.num_bytes = 0
        self.sent_at = 0.0  # when the encoded message was handed to gRPC


class _Stream:
    __slots__ = ("call", "closed", "proven", "stray_acks")

    def __init__(self) -> None:
        self.closed = False
        self.call: Any = None
        # Acknowledgements of no message in flight: logged once per stream, as the peer
        # could send any number.
        self.stray_acks = 0
        # Set once the peer proved to be the node expected (at once when none is):
        # nothing is sent before.
        self.proven = threading.Event()


class StreamSender(Generic[T]):
    """Streams ``build(item)`` for each ``put(item)`` to ``address`` over one bidi RPC.

    ``method`` is the RPC's path (``channel.method_path("Forward")``) and ``ack_type`` the
    message type of its responses. ``build`` returns a message, or its serialized bytes
    when it assembles them itself; either way the payload is made here, once, which also
    gives its exact size for the byte counters. ``on_ack(item, ack)`` sees each
    acknowledgement, ``on_failure(item, reason)`` each message that will never be
    acknowledged, ``observer`` the timing of each acknowledged message. Callbacks run on
    the sender's threads.
    """

    def __init__(
        self,
        name: str,
        address: str,
        config: TransportConfig,
        method: str,
        ack_type: type[Message],
        build: Callable[[T], Message | bytes],
        on_failure: Callable[[T, str], None],
        on_ack: Callable[[T, Any], None] | None = None,
        observer: DeliveryObserver | None = None,
        on_broken: Callable[[str, str], None] | None = None,
        expected_node_id: str | None = None,
    ) -> None:
        self.name = name
        self.address = address
        self._config = config
        self._build = build
        self._on_failure = on_failure
        self._on_ack = on_ack
        # (address, reason) when the stream breaks with an error, even with nothing pending:
        # a peer that died after acknowledging everything is noticed at once.
        self._on_broken = on_broken
        self.observer = observer
        # In a swarm, the peer at ``address`` must prove it is this node before any
        # message goes out (molink.security.peer_proof).
        self._expected = expected_node_id if config.security is not None else None
        self._cond = threading.Condition()
        self._queued: deque[_Pending[T]] = deque()
        self._unacked: deque[_Pending[T]] = deque()
        self._stopped = False
        self._stream: _Stream | None = None
        self.bytes_sent = 0
        self.messages_sent = 0
        self.messages_failed = 0
        self._channel = make_channel(address, config)
        # No request serializer: the requests are bytes already (see _encode).
        self._rpc = self._channel.stream_stream(
            method, request_serializer=None, response_deserializer=ack_type.FromString
        )
        self._thread = threading.Thread(target=self._run, name=f"send-{name}", daemon=True)
        self._thread.start()

    def put(self, item: T) -> None:
        with self._cond:
            if self._stopped:
                stopped = True
            else:
                stopped = False
                self._queued.append(_Pending(item))
                self._cond.notify_all()
        if stopped:
            self._fail([_Pending(item)], f"sender to {self.address} is closed")

    def pending(self) -> int:
        with self._cond:
            return len(self._queued) + len(self._unacked)

    def close(self, timeout: float = 2.0) -> None:
        """Stop sending; whatever is still queued or unacknowledged fails."""
        with self._cond:
            self._stopped = True
            stream = self._stream
            self._cond.notify_all()
        if stream is not None and stream.call is not None:
            stream.call.cancel()
        self._thread.join(timeout)
        with self._cond:
            leftover = list(self._unacked) + list(self._queued)
            self._unacked.clear()
            self._queued.clear()
        self._fail(leftover, f"sender to {self.address} was closed")
        self._channel.close()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queued or self._stopped, timeout=1.0)
                if self._stopped:
                    return
                if not self._queued:
                    continue
                stream = self._stream = _Stream()
            self._stream_once(stream)

    def _stream_once(self, stream: _Stream) -> None:
        reason = f"stream to {self.address} was closed by the peer"
        broken = False
        try:
            nonce = new_nonce()
            metadata = call_metadata()
            if self._expected is not None:
                metadata += ((NONCE_KEY, nonce),)
            stream.call = self._rpc(self._requests(stream), metadata=metadata)
            problem = self._proof_problem(stream, nonce)
            if problem is not None and not stream.call.done():
                stream.call.cancel()
                raise _NotTheExpectedNode(problem)
            stream.proven.set()  # or the call ended first: reading it tells how
            for ack in stream.call:
                self._acknowledge(ack, stream)
        except grpc.RpcError as exc:
            reason = f"stream to {self.address} failed: {describe_rpc_error(exc)}"
            broken = True
        except _NotTheExpectedNode as exc:
            reason = f"the peer at {self.address} is not node {self._expected}: {exc}"
            broken = True
        except Exception as exc:  # a callback bug must not kill the sender
            logger.exception("sender %s: unexpected error", self.name)
            reason = f"stream to {self.address} failed: {exc}"
        with self._cond:
            stream.closed = True
            self._stream = None
            if self._stopped:
                return  # close() fails what is left
            failed = list(self._unacked) + list(self._queued)
            self._unacked.clear()
            self._queued.clear()
        if failed:
            logger.warning("%s; %d message(s) not delivered", reason, len(failed))
        self._fail(failed, reason)
        if broken and self._on_broken is not None:
            try:
                self._on_broken(self.address, reason)
            except Exception:
                logger.exception("sender %s: the broken-stream callback failed", self.name)

    def _proof_problem(self, stream: _Stream, nonce: bytes) -> str | None:
        """Why the peer did not prove to be the node expected (None: it did, or none is
        expected); waits for the peer's initial metadata."""
        if self._expected is None:
            return None
        assert self._config.security is not None
        own_id = self._config.security.node_id
        return proof_problem(stream.call.initial_metadata(), nonce, own_id, self._expected)

    def _requests(self, stream: _Stream) -> Iterator[bytes]:
        while not stream.proven.wait(_WAIT_SLICE_S):
            with self._cond:
                if self._stopped or stream.closed:
                    return
        while True:
            with self._cond:
                self._cond.wait_for(
                    lambda: self._queued or self._stopped or stream.closed, timeout=_WAIT_SLICE_S
                )
                if self._stopped or stream.closed:
                    return
                if not self._queued:
                    continue
                pending = self._queued.popleft()
                self._unacked.append(pending)
            payload = self._encode(pending)
            if payload is not None:
                pending.num_bytes = len(payload)
                # After encoding: only the time the message spends on the link counts.
                pending.sent_at = time.monotonic()
                yield payload

    def _encode(self, pending: _Pending[T]) -> bytes | None:
        try:
            built = self._build(pending.item)
            payload = built if isinstance(built, bytes) else built.SerializeToString()
            size = len(payload)
            if size > self._config.max_message_bytes:
                raise ValueError(
                    f"message of {size} bytes exceeds max_message_bytes "
                    f"({self._config.max_message_bytes})"
                )
        except Exception as exc:
            with self._cond:
                if pending not in self._unacked:
                    return None  # the stream failed meanwhile and reported it
                self._unacked.remove(pending)
            logger.warning("sender %s: could not encode a message: %s", self.name, exc)
            self._fail([pending], f"could not encode a message for {self.address}: {exc}")
            return None
        self.bytes_sent += size
        self.messages_sent += 1
        return payload

    def _acknowledge(self, ack: Any, stream: _Stream) -> None:
        acked_at = time.monotonic()
        with self._cond:
            pending = self._unacked.popleft() if self._unacked else None
        if pending is None:
            stream.stray_acks += 1
            if stream.stray_acks == 1:
                logger.warning(
                    "sender %s: acknowledgement for no message in flight (further ones on "
                    "this stream are not logged)",
                    self.name,
                )
            return
        if self.observer is not None:
            self.observer.observe(pending.num_bytes, pending.sent_at, acked_at)
        if self._on_ack is not None:
            self._on_ack(pending.item, ack)

    def _fail(self, failed: list[_Pending[T]], reason: str) -> None:
        for pending in failed:
            self.messages_failed += 1
            try:
                self._on_failure(pending.item, reason)
            except Exception:
                logger.exception("sender %s: failure callback raised", self.name)
