"""How the head's engine loop drives the stages: submit plans, collect results."""

from __future__ import annotations

from typing import Protocol

from molink.step import StepPlan, StepResult


class PlanExecutor(Protocol):
    """Carries plans through every stage; results come back in any order across
    micro-batches but in order within one. ``submit`` never blocks on computing."""

    def submit(self, plan: StepPlan) -> None: ...

    def poll(self, timeout: float) -> list[StepResult]:
        """Results that have come back, waiting up to ``timeout`` seconds for the first."""

    def release(self, seq_ids: list[int]) -> None:
        """Free aborted sequences on every stage now, without waiting for the next plan."""

    def readiness(self) -> str | None:
        """None when every layer is covered, else a message naming the missing ranges."""

    def close(self) -> None: ...
