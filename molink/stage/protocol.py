"""What a node's runtime (local or behind gRPC) needs from the code that runs its layers."""

from __future__ import annotations

from typing import Protocol

import torch

from molink.step import StepPlan, StepResult


class StageExecutor(Protocol):
    """Runs one stage's layer range over micro-batches, in the order they arrive.

    Not thread-safe: one compute thread calls it. Per-sequence state is keyed by
    ``(head_id, seq_id)`` so that several heads may one day share a stage.

    An executor may also offer ``execute_many(steps, head_id)``: several plans of disjoint
    sequences in one pass, one result (or ProtocolError) per plan, in order (see
    StageWorker.execute_many). The compute thread then hands it the steps that queued up
    together (molink/pipeline/worker.py).
    """

    is_first: bool
    is_last: bool

    def execute(
        self, plan: StepPlan, hidden: torch.Tensor | None, head_id: str = ""
    ) -> torch.Tensor | StepResult:
        """First stage reads ``plan.token_ids`` (hidden is None); others read ``hidden``
        ([plan.num_tokens, hidden_size]). A non-last stage returns its output hidden states;
        the last stage samples and returns a StepResult."""

    def release(self, seq_ids: list[int], head_id: str = "") -> None:
        """Forget these sequences (finished, aborted, or the head is gone)."""
