"""The gRPC face of a StageNode: each RPC decodes its request and delegates."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from molink.errors import PipelineError
from molink.pipeline.wire import node_to_proto, view_from_proto, view_to_proto
from molink.pipeline.worker import ReleaseJob
from molink.transport.channel import NodeClient, describe_rpc_error
from molink.transport.convert import result_from_proto
from molink.transport.framing import parse_forward
from molink.transport.generated import molink_pb2 as pb
from molink.transport.generated import molink_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from molink.pipeline.node import StageNode

logger = logging.getLogger(__name__)


class NodeServicer(pb_grpc.MolinkNodeServicer):
    """Register with ``channel.add_node_service``: Forward requests arrive as bytes."""

    RAW_REQUESTS = frozenset({"Forward"})

    def __init__(self, node: StageNode) -> None:
        self._node = node

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        return node_to_proto(self._node.info)

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        head_role = self._node.head_role
        if head_role is not None:
            return head_role.handle_join(request)
        return self._forward_join(request)

    def _forward_join(self, request: pb.JoinRequest) -> pb.JoinResponse:
        """A member passes a join on to its head, so any member can be an initial peer."""
        view = self._node.links.any_view()
        if view is None or not view.head_address:
            return pb.JoinResponse(
                accepted=False,
                reason=f"node {self._node.node_id} is not part of a pipeline; join the head",
            )
        client = NodeClient(view.head_address, self._node.config)
        try:
            return client.join(request)
        except grpc.RpcError as exc:
            return pb.JoinResponse(
                accepted=False,
                reason=f"could not reach head {view.head_id} at {view.head_address}: "
                f"{describe_rpc_error(exc)}",
            )
        finally:
            client.close()

    def GetPipeline(
        self, request: pb.GetPipelineRequest, context: grpc.ServicerContext
    ) -> pb.Pipeline:
        head_role = self._node.head_role
        if head_role is not None:
            return head_role.pipeline_proto()
        view = self._node.links.any_view()
        if view is None:
            return pb.Pipeline(readiness=f"node {self._node.node_id} is not part of a pipeline")
        return view_to_proto(view)

    def UpdatePipeline(
        self, request: pb.Pipeline, context: grpc.ServicerContext
    ) -> pb.UpdatePipelineResponse:
        if self._node.head_role is not None:
            return pb.UpdatePipelineResponse(applied=False, reason="a head keeps its own pipeline")
        if self._node.links.get(request.head_id) is None:
            return pb.UpdatePipelineResponse(
                applied=False,
                reason=f"node {self._node.node_id} has not joined {request.head_id!r}",
            )
        applied = self._node.links.apply(view_from_proto(request))
        return pb.UpdatePipelineResponse(
            applied=applied, reason="" if applied else "an equal or newer epoch is known"
        )

    def Forward(
        self, request_iterator: Iterator[bytes], context: grpc.ServicerContext
    ) -> Iterator[pb.ForwardAck]:
        for raw in request_iterator:
            try:
                request, hidden_data = parse_forward(raw)
            except DecodeError as exc:
                yield self._node.reject_unparsable(len(raw), exc)
                continue
            yield self._node.handle_forward(request, len(raw), hidden_data)

    def ReturnResults(
        self, request_iterator: Iterator[pb.ReturnResultsRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ReturnResultsAck]:
        head_role = self._node.head_role
        for request in request_iterator:
            ack = pb.ReturnResultsAck(
                step_id=request.result.step_id, micro_batch=request.result.micro_batch
            )
            if head_role is None or request.head_id != self._node.node_id:
                logger.warning(
                    "node %s got a result for head %r from %s; it is not that head",
                    self._node.node_id,
                    request.head_id,
                    request.sender_id,
                )
            else:
                head_role.deliver_result(
                    result_from_proto(request.result),
                    list(request.result.trace),
                    request.sender_id,
                    request.ByteSize(),
                )
            yield ack

    def Release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        link = self._node.links.get(request.head_id)
        job = ReleaseJob(
            request.head_id, link.view.epoch if link else 0, tuple(request.seq_ids), False
        )
        try:
            self._node.submit(job)
        except PipelineError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return pb.ReleaseResponse(num_released=len(request.seq_ids))

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        return self._node.health()
