"""Where a node's outputs go: hidden states to the next hop of each step's route (and the
spot checks' mirrored rows along their check routes), releases onward, and results or
errors back to the route's head (in process when this node is that head)."""

from __future__ import annotations

import logging

import torch

from molink.pipeline.head_role import HeadRole
from molink.pipeline.links import LinkTable
from molink.pipeline.outbound import OutboundRelease, OutboundStep, StepError
from molink.pipeline.worker import ReleaseJob, StepJob, StepOutput
from molink.placement.route import Route
from molink.step import FailureKind, StepResult
from molink.transport.convert import result_to_proto
from molink.transport.generated import molink_pb2 as pb
from molink.transport.validate import release_chunks

logger = logging.getLogger(__name__)


class NodeOutbox:
    """The sending side of one StageNode (called on its compute and gRPC threads)."""

    def __init__(self, node_id: str, links: LinkTable, head_role: HeadRole | None) -> None:
        self._node_id = node_id
        self._links = links
        self._head_role = head_role

    def on_output(self, out: StepOutput) -> None:
        job = out.job
        if isinstance(out.output, StepResult):
            self.return_result(job.route, out.output, out.trace)
            return
        next_hop = job.route.next_after(self._node_id)
        if next_hop is None:
            self.report_step_error(
                StepError(
                    job.route,
                    job.plan.step_id,
                    job.plan.micro_batch,
                    f"stage {self._node_id} is the last hop of route {job.route.key} but "
                    "does not serve the last layer",
                    FailureKind.NODE_ERROR,
                    self._node_id,
                )
            )
            return
        sender = self._links.forward_to(next_hop.address, next_hop.node_id)
        sender.put(OutboundStep(job.head_id, job.route, job.plan, out.output, out.trace))
        if job.mirror is not None:
            self._send_mirror(job, out.output, out.trace)

    def _send_mirror(self, job: StepJob, output: torch.Tensor, trace: list) -> None:
        """The head's spot checks: the checked sequences' rows go along the check routes."""
        for part in job.mirror.parts:
            hop = part.route.next_after(self._node_id)
            if hop is None:
                continue
            rows = output[torch.tensor(part.rows, dtype=torch.long)]
            sender = self._links.forward_to(hop.address, hop.node_id)
            sender.put(OutboundStep(job.head_id, part.route, part.plan, rows, list(trace)))

    def on_release(self, job: ReleaseJob) -> None:
        if not job.propagate or job.route is None:
            return
        next_hop = job.route.next_after(self._node_id)
        if next_hop is not None:
            sender = self._links.forward_to(next_hop.address, next_hop.node_id)
            for chunk in release_chunks(job.seq_ids):  # the next stage's bound may be smaller
                sender.put(OutboundRelease(job.head_id, job.route, chunk, job.started_before_step))

    def return_result(self, route: Route, result: StepResult, trace: list[pb.HopTrace]) -> None:
        """Hand a result (or an error) to the route's head, locally or over ReturnResults."""
        head_id = route.head_id
        if self._head_role is not None and head_id == self._node_id:
            self._head_role.deliver_result(result, trace, self._node_id, 0)
            return
        sender = self._links.results_to(route.head_address, head_id)
        if sender is None:
            logger.error(
                "stage %s cannot reach head %r; dropping the result of step %d: %s",
                self._node_id,
                head_id,
                result.step_id,
                result.error or "ok",
            )
            return
        message = result_to_proto(result)
        message.trace.extend(trace)
        sender.put(
            pb.ReturnResultsRequest(head_id=head_id, sender_id=self._node_id, result=message)
        )

    def report_step_error(self, error: StepError) -> None:
        result = StepResult(
            step_id=error.step_id,
            micro_batch=error.micro_batch,
            error=error.message,
            failure_kind=error.kind,
            failed_node_id=error.node_id,
        )
        self.return_result(error.route, result, [])
