"""The plans in flight: the one registry of the steps handed out and not yet taken back.

The scheduler is its only writer (``schedule`` adds a non-empty plan with its sequences,
``update`` takes it back, ``fail_all`` forgets them all); the engine loop reads it to match
each result with its plan, to know which micro-batch slots are busy, and to let its pacer
count the prefill tokens on their way. Nothing else keeps a plan once it is submitted: the
pipeline head's record of a step holds only how it travels (route, deadline), keyed by the
same step id.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from molink.scheduler.sequence import Sequence
from molink.step import StepPlan


@dataclass(slots=True)
class InFlightStep:
    """A plan and its sequences, in the order of ``plan.scheduled``."""

    plan: StepPlan
    sequences: list[Sequence]


class InFlightView(Protocol):
    """What readers other than the scheduler may do with the registry."""

    def plan(self, step_id: int) -> StepPlan | None: ...

    def plans(self) -> list[StepPlan]: ...

    def busy_micro_batches(self) -> set[int]: ...

    def free_micro_batch(self, num_micro_batches: int) -> int | None: ...

    def __len__(self) -> int: ...


class InFlightPlans:
    """step id -> ``InFlightStep``. Single-threaded (the engine thread)."""

    def __init__(self) -> None:
        self._steps: dict[int, InFlightStep] = {}
        # micro-batch -> its steps in flight (one, unless a caller reuses a busy slot);
        # kept with the steps so that finding a free slot costs no scan of them.
        self._busy: dict[int, int] = {}

    # -- the scheduler's side --------------------------------------------------------

    def add(self, plan: StepPlan, sequences: list[Sequence]) -> None:
        if plan.step_id in self._steps:
            raise ValueError(f"step {plan.step_id} is already in flight")
        self._steps[plan.step_id] = InFlightStep(plan, sequences)
        self._busy[plan.micro_batch] = self._busy.get(plan.micro_batch, 0) + 1

    def pop(self, step_id: int) -> InFlightStep | None:
        step = self._steps.pop(step_id, None)
        if step is not None:
            slot = step.plan.micro_batch
            if self._busy[slot] == 1:
                del self._busy[slot]
            else:
                self._busy[slot] -= 1
        return step

    def clear(self) -> None:
        self._steps.clear()
        self._busy.clear()

    # -- readers ---------------------------------------------------------------------

    def plan(self, step_id: int) -> StepPlan | None:
        """The plan of ``step_id`` while it is in flight (None: unknown or already back)."""
        step = self._steps.get(step_id)
        return None if step is None else step.plan

    def plans(self) -> list[StepPlan]:
        return [step.plan for step in self._steps.values()]

    def busy_micro_batches(self) -> set[int]:
        return set(self._busy)

    def free_micro_batch(self, num_micro_batches: int) -> int | None:
        """The highest slot below ``num_micro_batches`` that no plan in flight holds."""
        busy = self._busy
        for slot in range(num_micro_batches - 1, -1, -1):
            if slot not in busy:
                return slot
        return None

    @property
    def num_sequences(self) -> int:
        return sum(len(step.sequences) for step in self._steps.values())

    def items(self) -> Iterator[tuple[int, InFlightStep]]:
        return iter(self._steps.items())

    def __contains__(self, step_id: object) -> bool:
        return step_id in self._steps

    def __len__(self) -> int:
        return len(self._steps)
