"""What a node streams to its peers: steps and releases onward, results to the head.

Encoding happens here, on the sender threads, so that the compute thread only hands
tensors over and goes on with the next micro-batch. Every step that cannot be delivered
is reported to its head as an error. Each stream measures its link (LinkEstimator) from
the acknowledgements of what it sends.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from molink.pipeline.link_estimator import LinkEstimator
from molink.pipeline.wire import route_to_proto
from molink.placement.route import Route, RouteSeal
from molink.security.peer_text import peer_text
from molink.security.route_seal import RouteSigner
from molink.step import FailureKind, StepPlan
from molink.transport.channel import method_path
from molink.transport.codec import encode_tensor_header
from molink.transport.config import TransportConfig
from molink.transport.convert import plan_to_proto
from molink.transport.framing import join_forward
from molink.transport.generated import molink_pb2 as pb
from molink.transport.sender import StreamSender

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepError:
    """A step that failed, addressed to its head (whose route says where it listens)."""

    route: Route
    step_id: int
    micro_batch: int
    message: str
    kind: FailureKind
    node_id: str  # the node the failure is about


ReportError = Callable[[StepError], None]


@dataclass
class OutboundStep:
    head_id: str
    route: Route
    plan: StepPlan
    hidden: torch.Tensor
    trace: list[pb.HopTrace]


@dataclass
class OutboundRelease:
    head_id: str
    route: Route
    seq_ids: tuple[int, ...]
    started_before_step: int | None = None  # as in ReleaseJob


Outbound = OutboundStep | OutboundRelease


class SenderFactory:
    """Builds the StreamSenders of one node (see molink.pipeline.links)."""

    def __init__(
        self,
        node_id: str,
        wire_dtype: str,
        config: TransportConfig,
        report_error: ReportError,
        is_head: bool,
        on_broken: Callable[[str, str], None] | None = None,
        signer: RouteSigner | None = None,
    ) -> None:
        self._node_id = node_id
        # A head in a swarm signs the routes it sends; a stage passes on the seal its
        # route came with (molink.security.route_seal).
        self._signer = signer
        self._wire_dtype = wire_dtype
        self._config = config
        self._report_error = report_error
        self._is_head = is_head
        self._on_broken = on_broken  # (address, reason) of a Forward stream that broke

    def forward(self, address: str, node_id: str) -> StreamSender[Any]:
        """A Forward stream to node ``node_id`` at ``address`` (in a swarm, the peer there
        must prove to be that node before anything is sent)."""
        peer = f"node {node_id} at {address}"
        return StreamSender(
            observer=LinkEstimator(),
            name=f"{self._node_id}->{address}",
            address=address,
            config=self._config,
            method=method_path("Forward"),
            ack_type=pb.ForwardAck,
            build=self._build_forward,
            on_failure=lambda item, reason: self._forward_failed(item, peer, reason),
            on_ack=self._forward_acked,
            on_broken=self._on_broken,
            expected_node_id=node_id,
        )

    def results(self, address: str, head_id: str) -> StreamSender[Any]:
        """A ReturnResults stream to head ``head_id`` at ``address`` (in a swarm, the peer
        there must prove to be that head)."""
        peer = f"head {head_id} at {address}"

        def failed(message: pb.ReturnResultsRequest, reason: str) -> None:
            logger.error(
                "stage %s could not return step %d to %s: %s",
                self._node_id,
                message.result.step_id,
                peer,
                reason,
            )

        return StreamSender(
            observer=LinkEstimator(),
            name=f"{self._node_id}->{peer}",
            address=address,
            config=self._config,
            method=method_path("ReturnResults"),
            ack_type=pb.ReturnResultsAck,
            build=lambda message: message,
            on_failure=failed,
            expected_node_id=head_id,
        )

    def _build_forward(self, item: Outbound) -> pb.ForwardRequest | bytes:
        request = pb.ForwardRequest(head_id=item.head_id, sender_id=self._node_id)
        request.route.CopyFrom(route_to_proto(item.route, self._seal_of(item.route)))
        if isinstance(item, OutboundRelease):
            request.release.head_id = item.head_id
            request.release.seq_ids.extend(item.seq_ids)
            if item.started_before_step is not None:
                request.release.started_before_step = item.started_before_step
            return request
        request.step.plan.CopyFrom(
            plan_to_proto(item.plan, include_token_ids=False, include_block_ids=False)
        )
        data = encode_tensor_header(item.hidden, self._wire_dtype, out=request.step.hidden)
        request.step.trace.extend(item.trace)
        return join_forward(request, data)

    def _seal_of(self, route: Route) -> RouteSeal | None:
        if self._signer is None or route.head_id != self._node_id:
            return None
        return self._signer.seal(route)

    def _forward_failed(self, item: Outbound, peer: str, reason: str) -> None:
        if isinstance(item, OutboundRelease):
            logger.warning(
                "node %s: release of %d sequences not delivered: %s",
                self._node_id,
                len(item.seq_ids),
                reason,
            )
            return
        next_hop = item.route.next_after(self._node_id)
        self._report_error(
            StepError(
                item.route,
                item.plan.step_id,
                item.plan.micro_batch,
                f"stage {self._node_id} could not deliver step {item.plan.step_id} to {peer}: "
                f"{reason}",
                FailureKind.UNREACHABLE,
                next_hop.node_id if next_hop else "",
            )
        )

    def _forward_acked(self, item: Outbound, ack: pb.ForwardAck) -> None:
        # A receiver that knows the head reports a rejection to it directly; the head
        # also takes it from the ack, in case the receiver does not know it.
        if ack.error and self._is_head and isinstance(item, OutboundStep):
            next_hop = item.route.next_after(self._node_id)
            self._report_error(
                StepError(
                    item.route,
                    item.plan.step_id,
                    item.plan.micro_batch,
                    peer_text(ack.error),
                    FailureKind.REJECTED,
                    next_hop.node_id if next_hop else "",
                )
            )
