"""What the head adds to its own node (molink.pipeline.node.StageNode): it takes joins,
describes its pipeline, hears of broken streams, knows the route of each of its steps
and receives their results. Implemented by PipelineExecutor."""

from __future__ import annotations

from typing import Protocol

from molink.placement.route import Route
from molink.step import StepResult
from molink.transport.generated import molink_pb2 as pb


class HeadRole(Protocol):
    """What the head adds to its node (implemented by PipelineExecutor)."""

    def handle_join(self, request: pb.JoinRequest) -> pb.JoinResponse: ...

    def pipeline_proto(self) -> pb.Pipeline: ...

    def peer_broke(self, address: str, reason: str) -> None:
        """The stream to the node at ``address`` broke (it may be gone)."""

    def route_of_step(self, step_id: int, micro_batch: int) -> Route | None: ...

    def deliver_result(
        self, result: StepResult, trace: list[pb.HopTrace], sender_id: str, num_bytes: int
    ) -> None: ...
