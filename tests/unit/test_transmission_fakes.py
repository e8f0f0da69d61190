"""Fakes for transmission scheduling and micro-batching tests: telemetry, clock, executor."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

from molink.engine.telemetry import LinkEstimate, StageTiming
from molink.step import StepPlan, StepResult
from tests.unit.test_scheduler_helpers import FakeStage

MB_PER_S = 1_000_000.0


def link(
    hop: str, bandwidth: float = math.inf, rtt_s: float = 0.0, samples: int = 10
) -> LinkEstimate:
    return LinkEstimate(hop, bandwidth, rtt_s, samples)


def timing(node_id: str, per_step: float, per_token: float = 0.0, samples: int = 10):
    return StageTiming(node_id, per_step, per_token, samples)


@dataclass
class FakeTelemetry:
    """A PipelineTelemetry whose measurements the test sets; counts how often it is read."""

    links: list[LinkEstimate] = field(default_factory=list)
    timings: list[StageTiming] = field(default_factory=list)
    bytes_per_token: int = 1000
    reads: int = 0
    fail: bool = False

    def link_estimates(self) -> list[LinkEstimate]:
        self.reads += 1
        if self.fail:
            raise RuntimeError("telemetry is broken")
        return list(self.links)

    def stage_timings(self) -> list[StageTiming]:
        return list(self.timings)

    def hidden_bytes_per_token(self) -> int:
        return self.bytes_per_token


def two_stage_telemetry(
    bandwidth: float = MB_PER_S,
    rtt_s: float = 0.02,
    compute_s: tuple[float, float] = (0.01, 0.01),
    bytes_per_token: int = 1000,
) -> FakeTelemetry:
    """Head -> s1 carries activations at ``bandwidth``; s1 -> head returns tokens."""
    return FakeTelemetry(
        links=[link("head->s1", bandwidth, rtt_s), link("s1->head", math.inf, rtt_s)],
        timings=[timing("head", compute_s[0]), timing("s1", compute_s[1])],
        bytes_per_token=bytes_per_token,
    )


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class QueuedExecutor:
    """A PlanExecutor for a pipeline: each plan runs on a FakeStage when submitted, but
    ``poll`` hands back only the oldest result, so several plans stay in flight."""

    def __init__(self, stage: FakeStage) -> None:
        self.stage = stage
        self.submitted: list[StepPlan] = []
        self._pending: deque[StepResult] = deque()

    def submit(self, plan: StepPlan) -> None:
        self.submitted.append(plan)
        self._pending.append(self.stage.execute(plan))

    def poll(self, timeout: float) -> list[StepResult]:
        return [self._pending.popleft()] if self._pending else []

    def release(self, seq_ids: list[int]) -> None:
        self.stage.execute(StepPlan(-1, (), (), finished_seq_ids=tuple(seq_ids)))

    def readiness(self) -> str | None:
        return None

    def close(self) -> None:
        self._pending.clear()
