"""What a node received, kept a little while so that spot checks can compare hidden states.

The head sees only the last node's tokens. To compare what two replicas of a span computed
(molink.pipeline.head_spot_checks), it asks the node *after* that span on the route, which
received both answers as its input: the primary's under the step's ids, the check's under
the shadow ids. Asking the next node rather than the checked one keeps the checked node
unaware of which of its steps are checked, and a node cannot report one value while it
sends another. This store keeps, per (head, step, micro-batch), the last row of each
sequence of the step's input (the row that a decode step carries and a prefill chunk
ends with), as float32 copies of the received values, for the most recent steps within
a byte budget; older steps are forgotten first. Only the sequences the head declares
checked (``StepPlan.witness_seq_ids``) are kept: with no checks (the default) a step costs
this store nothing; a plan that declares nothing (an older head) keeps every sequence.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch

from molink.step import StepPlan

DEFAULT_MAX_BYTES = 64 << 20
DEFAULT_MAX_STEPS = 4096

StepKey = tuple[str, int, int]  # (head id, step id, micro-batch)


class InputWitness:
    """Thread-safe: receiving threads record, the Witness RPC reads."""

    def __init__(
        self, max_bytes: int = DEFAULT_MAX_BYTES, max_steps: int = DEFAULT_MAX_STEPS
    ) -> None:
        self._max_bytes = max_bytes
        self._max_steps = max_steps
        self._lock = threading.Lock()
        self._steps: OrderedDict[StepKey, tuple[dict[int, int], torch.Tensor]] = OrderedDict()
        self._bytes = 0

    def record(self, head_id: str, plan: StepPlan, hidden: torch.Tensor) -> None:
        """Keep the last row of each checked sequence ``plan`` schedules from ``hidden``
        (its input, one row per token in ``scheduled`` order)."""
        declared = plan.witness_seq_ids
        if declared is not None and not declared:
            return  # nobody will ask about this step
        checked = frozenset(declared) if declared is not None else None
        index: dict[int, int] = {}
        last_rows: list[int] = []
        row = 0
        for seq in plan.scheduled:
            row += seq.num_new_tokens
            if seq.num_new_tokens and (checked is None or seq.seq_id in checked):
                index[seq.seq_id] = len(last_rows)
                last_rows.append(row - 1)
        if not last_rows or hidden.dim() != 2 or hidden.shape[0] < row:
            return
        rows = hidden[torch.tensor(last_rows, dtype=torch.long)].to(torch.float32)
        size = rows.numel() * rows.element_size()
        key = (head_id, plan.step_id, plan.micro_batch)
        with self._lock:
            old = self._steps.pop(key, None)
            if old is not None:
                self._bytes -= old[1].numel() * old[1].element_size()
            self._steps[key] = (index, rows)
            self._bytes += size
            while self._steps and (
                self._bytes > self._max_bytes or len(self._steps) > self._max_steps
            ):
                _, (_, dropped) = self._steps.popitem(last=False)
                self._bytes -= dropped.numel() * dropped.element_size()

    def __len__(self) -> int:
        """How many steps' rows are kept."""
        with self._lock:
            return len(self._steps)

    def rows(
        self, head_id: str, step_id: int, micro_batch: int, seq_ids: Sequence[int]
    ) -> torch.Tensor | str:
        """The kept rows of ``seq_ids`` (in that order), or why there are none."""
        with self._lock:
            kept = self._steps.get((head_id, step_id, micro_batch))
        if kept is None:
            return f"no input of step {step_id} (micro-batch {micro_batch}) is kept here"
        index, rows = kept
        absent = [s for s in seq_ids if s not in index]
        if absent:
            return f"step {step_id} (micro-batch {micro_batch}) had no rows of {absent[:8]}"
        return rows[torch.tensor([index[s] for s in seq_ids], dtype=torch.long)]
