"""Runs every stage of a plan in this process, one after the other (single node, or a
model split into several layer ranges inside one process for testing the seams).

With a ``wire_dtype``, the hidden states between stages take the exact path they take
between nodes: encoded by the wire codec, serialized to bytes, parsed and decoded, then
cast back to the compute dtype as a receiving node does. That measures what activation
compression costs in fidelity without starting a pipeline."""

from __future__ import annotations

import logging

import torch

from molink.errors import MolinkError
from molink.stage.protocol import StageExecutor
from molink.step import StepPlan, StepResult
from molink.transport.codec import decode_tensor, encode_tensor, wire_dtype_of
from molink.transport.generated import molink_pb2 as pb

logger = logging.getLogger(__name__)


class LocalExecutor:
    """A PlanExecutor whose stages live in this process. Submitting computes at once."""

    def __init__(self, stages: list[StageExecutor], wire_dtype: str | None = None) -> None:
        if not stages or not stages[0].is_first or not stages[-1].is_last:
            raise ValueError("local stages must cover the model from the first to the last layer")
        if wire_dtype is not None:
            wire_dtype_of(wire_dtype)  # a named error for an unknown dtype, now
        self.stages = stages
        self.wire_dtype = wire_dtype
        self._done: list[StepResult] = []

    def submit(self, plan: StepPlan) -> None:
        self._done.append(self._run(plan))

    def _run(self, plan: StepPlan) -> StepResult:
        hidden: torch.Tensor | None = None
        try:
            for stage in self.stages:
                out = stage.execute(plan, hidden)
                if isinstance(out, StepResult):
                    return out
                hidden = self.handoff(out)
        except MolinkError as exc:
            logger.error("step %d failed: %s", plan.step_id, exc)
            return StepResult(step_id=plan.step_id, micro_batch=plan.micro_batch, error=str(exc))
        raise AssertionError("the last stage did not return a StepResult")

    def handoff(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states as the next stage receives them (through the wire codec when a
        ``wire_dtype`` is set, else as they are)."""
        if self.wire_dtype is None:
            return hidden
        payload = encode_tensor(hidden, self.wire_dtype).SerializeToString()
        received = decode_tensor(
            pb.Tensor.FromString(payload), tuple(hidden.shape), len(payload), "hidden states"
        )
        return received.to(hidden.dtype)

    def poll(self, timeout: float) -> list[StepResult]:
        done, self._done = self._done, []
        return done

    def release(self, seq_ids: list[int]) -> None:
        for stage in self.stages:
            stage.release(seq_ids)

    def readiness(self) -> str | None:
        return None

    def close(self) -> None:
        self._done.clear()
