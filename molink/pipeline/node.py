"""StageNode: one node of the pipeline (a stage, or the head's own stage 0).

Threads: gRPC server threads receive and decode messages; one compute thread runs the
StageExecutor (ComputeWorker); one sender thread per peer streams outputs onward. Every
step names its route; the node forwards to the hop after its own, or, as the last hop,
returns the result to the route's head. Any head may send steps: their sequences are kept
apart by head id. A malformed, refused or failing step is reported to its head as a
StepResult with ``error`` and a ``FailureKind``, and the node keeps serving.

Its parts, one file each: the Join call (node_join), the checks of what arrives
(node_inbound), where outputs go (node_outbox) and the Health answer (node_health).

Starting a stage::

    node = StageNode(executor, info, TransportConfig(), initial_peer="10.0.0.1:50061")
    node.start()   # binds info.address (or bind_address), joins the head; raises on refusal
    ...
    node.stop()
"""

from __future__ import annotations

import logging
import threading
import time

import grpc
import torch

from molink.errors import InvalidParameterError, PipelineError, ProtocolError
from molink.kv_cache.stage_pool import StageBlockPool
from molink.pipeline.head_role import HeadRole
from molink.pipeline.identity import NodeInfo
from molink.pipeline.leases import LeaseTable
from molink.pipeline.links import LinkTable
from molink.pipeline.node_health import health_response
from molink.pipeline.node_inbound import answer_witness, check_route
from molink.pipeline.node_join import request_join
from molink.pipeline.node_outbox import NodeOutbox
from molink.pipeline.outbound import SenderFactory, StepError
from molink.pipeline.registry import JoinRefusedError, PipelineView
from molink.pipeline.servicer import NodeServicer, join_redirect
from molink.pipeline.wire import node_to_proto, view_from_proto
from molink.pipeline.witness import InputWitness
from molink.pipeline.worker import ComputeWorker, ReleaseJob, StepJob, StepOutput
from molink.placement.route import Route
from molink.security.limits import StreamLimiter
from molink.security.peer_proof import PeerProver
from molink.security.peer_text import peer_text
from molink.security.route_seal import RouteSigner, RouteVerifier
from molink.stage.protocol import StageExecutor
from molink.step import FailureKind, StepResult
from molink.transport.channel import (
    add_node_service,
    add_server_port,
    make_server,
)
from molink.transport.codec import decode_tensor, wire_dtype_of
from molink.transport.config import TransportConfig
from molink.transport.convert import plan_from_proto
from molink.transport.generated import molink_pb2 as pb
from molink.transport.validate import (
    PlanLimits,
    check_plan_message,
    check_release_size,
    validate_plan,
)

logger = logging.getLogger(__name__)


class StageNode:
    """A gRPC server around one StageExecutor.

    ``info.address`` is what the node advertises; it binds ``bind_address`` (default: the
    advertised address). Port 0 binds a free port and advertises it. ``input_dtype``, if
    set, is the dtype received activations are cast to before ``execute``.
    """

    def __init__(
        self,
        executor: StageExecutor,
        info: NodeInfo,
        config: TransportConfig | None = None,
        *,
        bind_address: str | None = None,
        initial_peer: str | None = None,
        input_dtype: torch.dtype | None = None,
        head_role: HeadRole | None = None,
        block_pool: StageBlockPool | None = None,
    ) -> None:
        try:
            wire_dtype_of(info.wire_dtype)
        except ProtocolError as exc:
            raise InvalidParameterError("wire_dtype", str(exc)) from None
        self.config = config or TransportConfig()
        self.info = info
        self._bind_address = bind_address or info.address or "127.0.0.1:0"
        self._initial_peer = initial_peer
        self._input_dtype = input_dtype
        self._head_role = head_role
        self._block_pool = block_pool  # the executor's own KV blocks, for health answers
        self._limits = PlanLimits.from_config(
            self.config, info.model.vocab_size, info.num_kv_blocks
        )
        self._worker = ComputeWorker(
            executor,
            info.node_id,
            on_output=self._on_output,
            on_error=lambda job, msg, kind: self.report_step_error(
                StepError(
                    job.route, job.plan.step_id, job.plan.micro_batch, msg, kind, self.node_id
                )
            ),
            on_release=self._on_release,
            max_queued=self.config.max_queued_steps,
            upstream_stall_s=self.config.upstream_stall_s,
            max_sequences_per_head=self.config.max_sequences_per_head,
            leases=None if head_role is not None else LeaseTable(self.config.lease_s),
            on_lapse=self._lease_lapsed,
            max_sequences_per_node=self.config.max_sequences_per_node,
            max_queued_per_node=self.config.max_queued_steps_per_node,
        )
        self._joined_head: str | None = None  # the head joined through the initial peer
        self._rejoining = threading.Lock()
        self.route_signer = _route_signer(self.config, head_role is not None)
        senders = SenderFactory(
            info.node_id,
            info.wire_dtype,
            self.config,
            self.report_step_error,
            head_role is not None,
            on_broken=head_role.peer_broke if head_role is not None else None,
            signer=self.route_signer,
        )
        self.route_verifier = RouteVerifier()  # seals of the routes other nodes pass on
        self.links = LinkTable(
            info.node_id,
            make_forward=senders.forward,
            make_results=None if head_role is not None else senders.results,
        )
        self._outbox = NodeOutbox(info.node_id, self.links, head_role)
        self.streams = StreamLimiter(
            self.config.max_streams_per_peer, self.config.max_streams_per_node
        )
        self._server: grpc.Server | None = None
        self._stopping = threading.Event()
        self._closers: list = []
        self._started_at = time.monotonic()
        self._counter_lock = threading.Lock()
        self.witness_store = InputWitness()  # inputs kept for the heads' spot checks
        self.bytes_received = 0
        self.steps_rejected = 0

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self.info.node_id

    @property
    def address(self) -> str:
        return self.info.address

    @property
    def head_role(self) -> HeadRole | None:
        return self._head_role

    def start(self) -> StageNode:
        """Bind and serve; with an initial peer, join (raises PipelineError, or
        JoinRefusedError with the head's reason, after stopping the node)."""
        server = make_server(self.config)
        prover = PeerProver(self.config.security.identity) if self.config.security else None
        add_node_service(NodeServicer(self), server, NodeServicer.RAW_REQUESTS, prover)
        port = add_server_port(server, self._bind_address, self.config)
        if port == 0:
            raise PipelineError(f"node {self.node_id} could not bind {self._bind_address}")
        server.start()
        self._server = server
        self.info = self.info.with_address(_advertised(self.info.address, self._bind_address, port))
        self._worker.start()
        logger.info(
            "node %s serving layers [%d, %d) on %s (advertised %s)",
            self.node_id,
            self.info.layers.start,
            self.info.layers.end,
            self._bind_address,
            self.info.address,
        )
        if self._initial_peer:
            try:
                self.join(self._initial_peer)
            except Exception:
                self.stop()  # a node that could not join serves nothing
                raise
        return self

    @property
    def throughput_tokens_per_s(self) -> float:
        """Measured tokens per second of this node's compute (0.0 before its first step)."""
        return self._worker.throughput.tokens_per_s

    def add_closer(self, close) -> None:
        """Run ``close`` (no arguments) first when the node stops: discovery, the DHT."""
        self._closers.append(close)

    def stop(self) -> None:
        for close in self._closers:
            close()
        self._closers = []
        self._stopping.set()
        if self._server is not None:
            self._server.stop(grace=0.2).wait(2.0)
        self._worker.stop()
        self.links.close()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until stop() (e.g. from a signal handler); True if stopped."""
        return self._stopping.wait(timeout)

    # -- membership ------------------------------------------------------------------------

    def join(self, peer: str) -> PipelineView:
        """Join the head through ``peer``; retry while unreachable, raise on refusal. A
        swarm member answers with its head's address (it cannot vouch for this node's
        identity), which is followed once."""
        request = pb.JoinRequest(node=node_to_proto(self.info), credentials=pb.Credentials())
        response = self._request_join(peer, request)
        redirect = join_redirect(response)
        if redirect is not None and redirect != peer:
            logger.info(
                "node %s: %s sends the join to the head at %s", self.node_id, peer, redirect
            )
            peer, response = redirect, self._request_join(redirect, request)
        if not response.accepted:
            logger.error("node %s: join refused by %s: %s", self.node_id, peer, response.reason)
            raise JoinRefusedError(response.reason)
        view = view_from_proto(response.pipeline)
        self.links.forget_head(view.head_id)  # a restarted head counts epochs anew
        self.links.apply(view)
        self._joined_head = view.head_id
        if self._worker.leases is not None:
            self._worker.leases.renew(view.head_id)
        logger.info(
            "node %s joined head %s (epoch %d): %s",
            self.node_id,
            view.head_id,
            view.epoch,
            view.readiness() or "every layer is served",
        )
        return view

    def renew_lease(self, head_id: str) -> None:
        """``head_id`` checked on this node: it still counts on the sequences it keeps here."""
        if self._worker.leases is not None:
            self._worker.leases.renew(head_id)

    def _lease_lapsed(self, head_id: str) -> None:
        """The head this node joined fell silent (it died, restarted, or dropped this
        node): join again through the initial peer, as a fresh node, in the background."""
        if head_id != self._joined_head or not self._initial_peer or self._stopping.is_set():
            return
        threading.Thread(target=self._rejoin, name=f"rejoin-{self.node_id}", daemon=True).start()

    def _rejoin(self) -> None:
        if not self._rejoining.acquire(blocking=False):
            return
        try:
            view = self.links.any_view()
            if view is not None and view.head_address:
                self.links.drop_peer(view.head_address)
            while not self._stopping.is_set():
                try:
                    self.join(self._initial_peer or "")
                    return
                except PipelineError as exc:
                    logger.warning("node %s: rejoining failed, retrying: %s", self.node_id, exc)
                except Exception:
                    logger.exception("node %s: rejoining failed, retrying", self.node_id)
                self._stopping.wait(self.config.join_interval_s)
        finally:
            self._rejoining.release()

    def _request_join(self, peer: str, request: pb.JoinRequest) -> pb.JoinResponse:
        return request_join(self.node_id, peer, request, self.config, self._stopping)

    # -- receiving -------------------------------------------------------------------------

    def handle_forward(
        self, request: pb.ForwardRequest, num_bytes: int, hidden_data: memoryview | None = None
    ) -> pb.ForwardAck:
        """Decode, check and queue one Forward message; the ack says if it was rejected.
        ``hidden_data`` holds the activations when they came apart from the message
        (molink.transport.framing)."""
        with self._counter_lock:
            self.bytes_received += num_bytes
        step = request.step
        ack = pb.ForwardAck(step_id=step.plan.step_id, micro_batch=step.plan.micro_batch)
        route: Route | None = None
        try:
            kind = request.WhichOneof("payload")
            route = self._check_route(request, releasing=kind == "release")
            if kind == "release":
                release = request.release
                check_release_size(
                    len(release.seq_ids),
                    self.config.max_sequences_per_head,
                    f"release of head {request.head_id}",
                )
                before = (
                    release.started_before_step if release.HasField("started_before_step") else None
                )
                self.submit(
                    ReleaseJob(request.head_id, route, tuple(release.seq_ids), True, before)
                )
                return ack
            if kind != "step":
                raise ProtocolError("forward message carries neither a step nor a release")
            self.submit(self._decode_step(request, route, num_bytes, hidden_data))
        except (ProtocolError, PipelineError) as exc:
            ack.error = self._reject(request, route, exc)
        return ack

    def reject_unauthorized(
        self, request: pb.ForwardRequest, num_bytes: int, reason: str
    ) -> pb.ForwardAck:
        """A message from a peer not entitled to it: refused and counted (the servicer logs
        it), not reported to the head it names (the sender could otherwise flood that head)."""
        plan = request.step.plan
        message = f"stage {self.node_id} refused a forward message: {reason}"
        with self._counter_lock:
            self.bytes_received += num_bytes
            self.steps_rejected += 1
        return pb.ForwardAck(step_id=plan.step_id, micro_batch=plan.micro_batch, error=message)

    def reject_unparsable(self, num_bytes: int, exc: Exception) -> pb.ForwardAck:
        """Counted and answered; the servicer logs it, at a bounded rate per peer."""
        message = f"stage {self.node_id} got a forward message it cannot parse: {exc}"
        with self._counter_lock:
            self.bytes_received += num_bytes
            self.steps_rejected += 1
        return pb.ForwardAck(error=message)

    def _check_route(self, request: pb.ForwardRequest, releasing: bool = False) -> Route:
        is_head = self._head_role is not None
        return check_route(request, self.info, is_head, self.links.dropped_by, releasing)

    def _decode_step(
        self,
        request: pb.ForwardRequest,
        route: Route,
        num_bytes: int,
        hidden_data: memoryview | None,
    ) -> StepJob:
        check_plan_message(request.step.plan, self._limits)
        hops_before = route.index_of(self.node_id) or 0
        if len(request.step.trace) > hops_before:
            # One entry per hop before this one; more would only be copied and passed on.
            raise ProtocolError(
                f"step {request.step.plan.step_id}: {len(request.step.trace)} trace entries "
                f"for the {hops_before} hop(s) before node {self.node_id} on route {route.key}"
            )
        plan = plan_from_proto(request.step.plan)
        validate_plan(plan, self._limits)
        hidden = decode_tensor(
            request.step.hidden,
            (plan.num_tokens, self.info.model.hidden_size),
            self.config.max_message_bytes,
            what=f"hidden states of step {plan.step_id}",
            data=hidden_data,
        )
        self.witness_store.record(request.head_id, plan, hidden)
        if self._input_dtype is not None:
            hidden = hidden.to(self._input_dtype)
        return StepJob(
            head_id=request.head_id,
            route=route,
            plan=plan,
            hidden=hidden,
            trace=list(request.step.trace),
            bytes_received=num_bytes,
        )

    def _reject(self, request: pb.ForwardRequest, route: Route | None, exc: Exception) -> str:
        plan = request.step.plan
        message = (
            f"stage {self.node_id} rejected step {plan.step_id} (micro-batch "
            f"{plan.micro_batch}) from {peer_text(request.sender_id) or 'an unnamed peer'}: "
            f"{peer_text(str(exc))}"
        )
        logger.warning("%s", message)
        with self._counter_lock:
            self.steps_rejected += 1
        if request.WhichOneof("payload") == "step" and route is not None:
            self.report_step_error(
                StepError(
                    route,
                    plan.step_id,
                    plan.micro_batch,
                    message,
                    FailureKind.REJECTED,
                    self.node_id,
                )
            )
        return message

    def submit(self, job: StepJob | ReleaseJob) -> None:
        """Queue work for the compute thread (raises PipelineError when overloaded)."""
        self._worker.submit(job, timeout=self.config.step_timeout_s)

    def witness(self, request: pb.WitnessRequest) -> pb.WitnessResponse:
        """What this node received of the head's steps (molink.pipeline.witness); raises
        ProtocolError for a request over the limits."""
        return answer_witness(
            request,
            self.witness_store,
            self.info.model.hidden_size,
            self.config.max_message_bytes,
        )

    # -- sending (molink.pipeline.node_outbox) ---------------------------------------------

    def _on_output(self, out: StepOutput) -> None:
        self._outbox.on_output(out)

    def _on_release(self, job: ReleaseJob) -> None:
        self._outbox.on_release(job)

    def return_result(self, route: Route, result: StepResult, trace: list[pb.HopTrace]) -> None:
        """Hand a result (or an error) to the route's head, locally or over ReturnResults."""
        self._outbox.return_result(route, result, trace)

    def report_step_error(self, error: StepError) -> None:
        self._outbox.report_step_error(error)

    # -- status ----------------------------------------------------------------------------

    def current_view(self) -> PipelineView | None:
        if self._head_role is not None:
            return self.links.get(self.node_id)
        return self.links.any_view()

    def health(self) -> pb.HealthResponse:
        view = self.current_view()
        with self._counter_lock:
            counters = (self.bytes_received, self.steps_rejected)
        return health_response(
            self.node_id,
            view,
            self._worker,
            self.links,
            counters,
            self._started_at,
            self._block_pool,
        )


def _advertised(advertised: str, bind_address: str, port: int) -> str:
    """Fill in the bound port (and a host) when the node was told to bind port 0."""
    host, _, configured = (advertised or bind_address).rpartition(":")
    if host in ("", "0.0.0.0", "[::]"):
        host = "127.0.0.1"
        logger.warning("no address to advertise; using %s:%d", host, port)
    return f"{host}:{configured if configured not in ('', '0') else port}"


def _route_signer(config: TransportConfig, is_head: bool) -> RouteSigner | None:
    """A head in a swarm signs its routes; in open mode nothing is signed or checked."""
    if not is_head or config.security is None:
        return None
    return RouteSigner(config.security.identity)
