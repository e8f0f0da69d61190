"""Tokens held for a spot check's verdict (StepResult.held_seq_ids): the held sequence
waits, the others of its step go on at once; a kept token is reported as ``update`` would
have; a dropped one is gone and the sequence replays from the tokens it had, producing
what a run without the lie gives; a sequence aborted while held is freed."""

from __future__ import annotations

import dataclasses

from molink.step import StepPlan, StepResult
from tests.unit.test_scheduler_helpers import (
    FakeStage,
    collect,
    flush,
    make_scheduler,
    params,
    run_to_completion,
)


def _held_step(scheduler, stage, held: tuple[int, ...]) -> tuple[StepPlan, StepResult, list]:
    plan = scheduler.schedule()
    result = dataclasses.replace(stage.execute(plan), held_seq_ids=held)
    updates = scheduler.update(plan, result)
    scheduler.check_integrity()
    return plan, result, updates


def _two_requests():
    scheduler = make_scheduler(enable_prefix_caching=False)
    scheduler.add_request("a", [5, 6, 7], params(max_tokens=4))
    scheduler.add_request("b", [8, 9], params(max_tokens=4))
    return scheduler, FakeStage(scheduler)


def test_a_held_token_waits_and_the_rest_of_its_step_goes_on() -> None:
    scheduler, stage = _two_requests()
    plan, result, updates = _held_step(scheduler, stage, held=(0,))
    assert [u.seq_id for u in updates] == [1] and scheduler.num_unverified == 1
    following = scheduler.schedule()
    assert [s.seq_id for s in following.scheduled] == [1]  # 0 waits for its verdict
    collect({}, scheduler.update(following, stage.execute(following)))
    assert scheduler.resolve_unverified(0, plan.step_id + 1, keep=True) == []  # stale
    (kept,) = scheduler.resolve_unverified(0, plan.step_id, keep=True)
    token = next(t.token_id for t in result.sampled if t.seq_id == 0)
    assert kept.new_token_id == token and scheduler.num_unverified == 0
    scheduler.check_integrity()
    assert 0 in [s.seq_id for s in scheduler.schedule().scheduled]


def test_a_dropped_token_replays_the_sequence_to_what_an_honest_run_gives() -> None:
    reference_scheduler, reference_stage = _two_requests()
    reference = run_to_completion(reference_scheduler, reference_stage)
    scheduler, stage = _two_requests()
    outputs: dict[int, list[int]] = {}
    plan, _, updates = _held_step(scheduler, stage, held=(0,))
    collect(outputs, updates)
    assert scheduler.resolve_unverified(0, plan.step_id, keep=False) == []
    assert scheduler.num_replayed_sequences == 1 and scheduler.num_unverified == 0
    scheduler.check_integrity()
    for _ in range(50):
        if not scheduler.has_unfinished():
            break
        plan = scheduler.schedule()
        collect(outputs, scheduler.update(plan, stage.execute(plan)))
        scheduler.check_integrity()
    flush(scheduler, stage)
    assert outputs == reference


def test_a_sequence_aborted_while_held_is_freed() -> None:
    scheduler, stage = _two_requests()
    plan, _, _ = _held_step(scheduler, stage, held=(0, 1))
    scheduler.abort_request("a")
    scheduler.check_integrity()
    assert scheduler.resolve_unverified(0, plan.step_id, keep=True) == []
    (kept,) = scheduler.resolve_unverified(1, plan.step_id, keep=True)
    assert kept.seq_id == 1 and scheduler.num_unverified == 0
    scheduler.abort_request("b")
    flush(scheduler, stage)
