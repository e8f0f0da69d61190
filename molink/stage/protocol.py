"""What a node's runtime (local or behind gRPC) needs from the code that runs its layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch

from molink.errors import ProtocolError
from molink.kv_cache.stage_pool import KVRoomError
from molink.step import StepPlan, StepResult


class StageExecutor(Protocol):
    """Runs one stage's layer range over micro-batches, in the order they arrive.

    Not thread-safe: one compute thread calls it. Per-sequence state is keyed by
    ``(head_id, seq_id)``: several heads share a stage and never see each other's.
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

    def execute_many(
        self, steps: Sequence[tuple[StepPlan, torch.Tensor | None]], head_id: str = ""
    ) -> list[torch.Tensor | StepResult | ProtocolError | KVRoomError]:
        """Several plans of disjoint sequences of one head in one pass (the steps that
        queued up together on the compute thread, molink/pipeline/worker.py): one result
        per plan, in order; a plan that fails comes back as its error (KVRoomError: the
        node had no room and kept nothing of it) and the others still run."""
