"""Runs every stage of a plan in this process, one after the other (single node, or a
model split into several layer ranges inside one process for testing the seams)."""

from __future__ import annotations

import logging

import torch

from molink.errors import MolinkError
from molink.stage.protocol import StageExecutor
from molink.step import StepPlan, StepResult

logger = logging.getLogger(__name__)


class LocalExecutor:
    """A PlanExecutor whose stages live in this process. Submitting computes at once."""

    def __init__(self, stages: list[StageExecutor]) -> None:
        if not stages or not stages[0].is_first or not stages[-1].is_last:
            raise ValueError("local stages must cover the model from the first to the last layer")
        self.stages = stages
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
                hidden = out
        except MolinkError as exc:
            logger.error("step %d failed: %s", plan.step_id, exc)
            return StepResult(step_id=plan.step_id, micro_batch=plan.micro_batch, error=str(exc))
        raise AssertionError("the last stage did not return a StepResult")

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
