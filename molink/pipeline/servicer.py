"""The gRPC face of a StageNode: each RPC decodes its request and delegates."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from molink.errors import PipelineError, ProtocolError
from molink.pipeline.authorization import (
    check_forward,
    check_join,
    check_release,
    check_result,
    check_update,
    check_witness,
)
from molink.pipeline.wire import node_to_proto, route_from_proto, view_from_proto, view_to_proto
from molink.pipeline.worker import ReleaseJob
from molink.security.credentials import peer_node_id
from molink.security.limits import LimitExceededError, RateLimiter, RefusalLog
from molink.step import FailureKind, StepResult
from molink.transport.channel import NodeClient, describe_rpc_error
from molink.transport.convert import result_from_proto
from molink.transport.framing import parse_forward
from molink.transport.generated import molink_pb2 as pb
from molink.transport.generated import molink_pb2_grpc as pb_grpc
from molink.transport.validate import check_release_size, result_problem

if TYPE_CHECKING:
    from molink.pipeline.node import HeadRole, StageNode

# A swarm member's answer to a join meant for its head: "join the head at ADDRESS".
JOIN_REDIRECT = "join the head directly at"

logger = logging.getLogger(__name__)


def join_redirect(response: pb.JoinResponse) -> str | None:
    """The head's address when ``response`` sends the join there, else None."""
    if response.accepted or not response.reason.startswith(JOIN_REDIRECT):
        return None
    return response.pipeline.head_address or None


class NodeServicer(pb_grpc.MolinkNodeServicer):
    """Register with ``channel.add_node_service``: Forward requests arrive as bytes."""

    RAW_REQUESTS = frozenset({"Forward"})

    def __init__(self, node: StageNode) -> None:
        self._node = node
        config = node.config
        self._streams = node.streams
        self._joins = RateLimiter(
            "joins", config.join_burst, config.join_interval_s, config.node_join_burst
        )
        self._refusals = RefusalLog(logger)

    def Describe(self, request: pb.DescribeRequest, context: grpc.ServicerContext) -> pb.NodeInfo:
        return node_to_proto(self._node.info)

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinResponse:
        caller = peer_node_id(context)
        refusal = check_join(caller, request)
        if refusal is None:
            try:
                self._joins.check(caller)
            except LimitExceededError as exc:
                refusal = str(exc)
        if refusal is not None:
            self._refusals.refused(caller, f"node {self._node.node_id} refused a join: {refusal}")
            return pb.JoinResponse(accepted=False, reason=refusal)
        head_role = self._node.head_role
        if head_role is not None:
            return head_role.handle_join(request)
        if caller is not None:
            return self._redirect_join()
        return self._forward_join(request)

    def _redirect_join(self) -> pb.JoinResponse:
        """A member cannot vouch for another node's identity, so in a swarm it sends the
        joining node to its head instead of passing the join on."""
        view = self._node.links.any_view()
        if view is None or not view.head_address:
            return pb.JoinResponse(
                accepted=False,
                reason=f"node {self._node.node_id} is not part of a pipeline; join the head",
            )
        return pb.JoinResponse(
            accepted=False,
            reason=f"{JOIN_REDIRECT} {view.head_address}",
            pipeline=view_to_proto(view),
        )

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
        caller = peer_node_id(context)
        refusal = check_update(caller, request)
        self._deny_if_refused(caller, refusal, context)
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
        caller = peer_node_id(context)
        with self._hold_stream(caller, context):
            for raw in request_iterator:
                try:
                    request, hidden_data = parse_forward(raw)
                except DecodeError as exc:
                    ack = self._node.reject_unparsable(len(raw), exc)
                    self._refusals.refused(caller, ack.error)
                    yield ack
                    continue
                refusal = self._forward_refusal(caller, request)
                if refusal is not None:
                    ack = self._node.reject_unauthorized(request, len(raw), refusal)
                    self._refusals.refused(caller, ack.error)
                    yield ack
                    continue
                yield self._node.handle_forward(request, len(raw), hidden_data)

    def _forward_refusal(self, caller: str | None, request: pb.ForwardRequest) -> str | None:
        route = route_from_proto(request.route)
        return check_forward(caller, route, self._node.node_id, self._node.route_verifier.problem)

    @contextlib.contextmanager
    def _hold_stream(self, caller: str | None, context: grpc.ServicerContext) -> Iterator[None]:
        """Bounds the streams one member holds at once (each ties up a server thread)."""
        try:
            self._streams.acquire(caller)
        except LimitExceededError as exc:
            self._refusals.refused(caller, f"node {self._node.node_id}: {exc}")
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        try:
            yield
        finally:
            self._streams.release(caller)

    def ReturnResults(
        self, request_iterator: Iterator[pb.ReturnResultsRequest], context: grpc.ServicerContext
    ) -> Iterator[pb.ReturnResultsAck]:
        head_role = self._node.head_role
        caller = peer_node_id(context)
        with self._hold_stream(caller, context):
            yield from self._results(head_role, caller, request_iterator)

    def _results(
        self,
        head_role: HeadRole | None,
        caller: str | None,
        request_iterator: Iterator[pb.ReturnResultsRequest],
    ) -> Iterator[pb.ReturnResultsAck]:
        for request in request_iterator:
            ack = pb.ReturnResultsAck(
                step_id=request.result.step_id, micro_batch=request.result.micro_batch
            )
            refusal = None
            if head_role is not None:
                route = head_role.route_of_step(request.result.step_id, request.result.micro_batch)
                refusal = check_result(caller, request, route)
            if refusal is not None:
                self._refusals.refused(
                    caller, f"head {self._node.node_id} ignored a result: {refusal}"
                )
            elif head_role is None or request.head_id != self._node.node_id:
                self._refusals.refused(
                    caller,
                    f"node {self._node.node_id} got a result for head {request.head_id!r} "
                    f"from {caller or request.sender_id}; it is not that head",
                )
            else:
                sender = caller or request.sender_id  # the certificate, when there is one
                head_role.deliver_result(
                    self._result_of(request.result, sender),
                    list(request.result.trace),
                    sender,
                    request.ByteSize(),
                )
            yield ack

    def _result_of(self, message: pb.StepResult, sender: str) -> StepResult:
        """The result ``message`` carries; one over the bounds of any step fails that step
        (its sequences replay), named, rather than be built."""
        problem = result_problem(message, self._node.config, self._node.info.model.num_layers)
        if problem is None:
            return result_from_proto(message)
        error = f"node {sender} returned a result over the limits: {problem}"
        self._refusals.refused(sender, f"head {self._node.node_id}: {error}")
        return StepResult(
            step_id=message.step_id,
            micro_batch=message.micro_batch,
            error=error,
            failure_kind=FailureKind.REJECTED,
        )

    def Release(
        self, request: pb.ReleaseRequest, context: grpc.ServicerContext
    ) -> pb.ReleaseResponse:
        caller = peer_node_id(context)
        refusal = check_release(caller, request.head_id)
        self._deny_if_refused(caller, refusal, context)
        try:
            check_release_size(
                len(request.seq_ids),
                self._node.config.max_sequences_per_head,
                f"release of head {request.head_id}",
            )
        except ProtocolError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        before = request.started_before_step if request.HasField("started_before_step") else None
        job = ReleaseJob(request.head_id, None, tuple(request.seq_ids), False, before)
        try:
            self._node.submit(job)
        except PipelineError as exc:
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
        return pb.ReleaseResponse(num_released=len(request.seq_ids))

    def Witness(
        self, request: pb.WitnessRequest, context: grpc.ServicerContext
    ) -> pb.WitnessResponse:
        caller = peer_node_id(context)
        refusal = check_witness(caller, request.head_id)
        self._deny_if_refused(caller, refusal, context)
        try:
            return self._node.witness(request)
        except ProtocolError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))

    def Health(self, request: pb.HealthRequest, context: grpc.ServicerContext) -> pb.HealthResponse:
        caller = peer_node_id(context)
        # Only the head itself renews its lease (any caller, in open mode).
        if request.head_id and (caller is None or caller == request.head_id):
            self._node.renew_lease(request.head_id)
        return self._node.health()

    def _deny_if_refused(
        self, caller: str | None, refusal: str | None, context: grpc.ServicerContext
    ) -> None:
        """Log a refused call and end it with PERMISSION_DENIED (``abort`` raises)."""
        if refusal is not None:
            self._refusals.refused(caller, f"node {self._node.node_id}: {refusal}")
            context.abort(grpc.StatusCode.PERMISSION_DENIED, refusal)
