"""Sequences sent back to the waiting queue together, by a plan that failed or came back
with its node lost, keep their first-come-first-served order: the oldest is admitted
first again, as after a preemption or a replay of idle sequences."""

from __future__ import annotations

import pytest

from molink.step import FailureKind, StepResult
from tests.unit.test_scheduler_helpers import FakeStage, make_scheduler, params

PROMPT_LEN = 7


def _three_in_one_plan():
    sched = make_scheduler()
    stage = FakeStage(sched)
    for index in range(3):
        sched.add_request(f"r{index}", list(range(100 + index, 100 + index + PROMPT_LEN)), params())
    plan = sched.schedule()
    assert [s.seq_id for s in plan.scheduled] == [0, 1, 2]
    return sched, stage, plan


def _admitted_after_release(sched, stage) -> list[int]:
    """The releases go out first; then a plan with room for one prompt admits the head
    (and, with a prefix-cache hit, part of the next one)."""
    release = sched.schedule()
    assert release.is_empty and sorted(release.finished_seq_ids) == [0, 1, 2]
    stage.execute(release)
    plan = sched.schedule(token_budget=PROMPT_LEN)
    return [s.seq_id for s in plan.scheduled]


@pytest.mark.parametrize("kind", [FailureKind.KV_FULL, FailureKind.UNREACHABLE])
def test_a_failed_plans_sequences_wait_oldest_first(kind: FailureKind) -> None:
    sched, stage, plan = _three_in_one_plan()
    stage.execute(plan)
    failed = StepResult(plan.step_id, micro_batch=plan.micro_batch, error="x", failure_kind=kind)
    assert sched.update(plan, failed) == []
    assert sched.prefill_candidate_ids() == [0]
    assert _admitted_after_release(sched, stage)[0] == 0


def test_sequences_replayed_while_in_flight_wait_oldest_first() -> None:
    sched, stage, plan = _three_in_one_plan()
    sched.replay([0, 1, 2])  # the node is lost while the plan is out
    sched.update(plan, stage.execute(plan))
    assert sched.prefill_candidate_ids() == [0]
    assert _admitted_after_release(sched, stage)[0] == 0
