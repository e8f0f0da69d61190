"""A stage that has no KV room for a plan refuses it (``KV_FULL``) and keeps nothing: the
plan's sequences restart from scratch once there is room. A sequence that no stage ever
has room for must not go round that way for ever: after ``MAX_ROOM_REFUSALS`` refusals it
fails with an error saying so, and the sequences refused with it carry on."""

from __future__ import annotations

from molink.scheduler.outcomes import MAX_ROOM_REFUSALS
from molink.step import FailureKind, StepPlan, StepResult
from tests.unit.test_scheduler_helpers import (
    FakeStage,
    collect,
    flush,
    make_scheduler,
    params,
    run_to_completion,
)

LONG_PROMPT = list(range(100, 124))
SHORT_PROMPT = [5, 6, 7]


def _refused(stage: FakeStage, plan: StepPlan) -> StepResult:
    stage.execute(plan)  # the fake stage keeps its copy: the head's release frees it
    return StepResult(
        plan.step_id,
        micro_batch=plan.micro_batch,
        error="stage n rejected the step: no KV room",
        failure_kind=FailureKind.KV_FULL,
        failed_node_id="n",
    )


def test_a_sequence_refused_every_time_ends_with_an_error() -> None:
    sched = make_scheduler()
    stage = FakeStage(sched)
    (seq_id,) = sched.add_request("r", SHORT_PROMPT, params(max_tokens=4))
    errors, refusals = [], 0
    for _ in range(3 * MAX_ROOM_REFUSALS):  # a requeued sequence waits for its release
        plan = sched.schedule()
        if plan.is_empty:
            stage.execute(plan)
            continue
        refusals += 1
        errors += [u.error for u in sched.update(plan, _refused(stage, plan)) if u.error]
    assert refusals == MAX_ROOM_REFUSALS + 1
    assert len(errors) == 1
    assert "no KV room" in errors[0] and f"refused {MAX_ROOM_REFUSALS + 1} times" in errors[0]
    assert sched.get_sequence(seq_id) is None or sched.get_sequence(seq_id).is_finished
    flush(sched, stage)


def test_the_sequence_that_never_fits_fails_alone() -> None:
    """Every plan with the long sequence is refused; the short one shares those plans."""
    reference = make_scheduler()
    reference.add_request("short", SHORT_PROMPT, params(max_tokens=6))
    expected = run_to_completion(reference, FakeStage(reference))

    sched = make_scheduler()
    stage = FakeStage(sched)
    (long_id,) = sched.add_request("long", LONG_PROMPT, params(max_tokens=6))
    (short_id,) = sched.add_request("short", SHORT_PROMPT, params(max_tokens=6))
    outputs: dict[int, list[int]] = {}
    errors: dict[int, str] = {}
    shared = 0
    for _ in range(20 * MAX_ROOM_REFUSALS):
        if not sched.has_unfinished():
            break
        plan = sched.schedule()
        named = {s.seq_id for s in plan.scheduled}
        if long_id in named:
            shared += short_id in named
            updates = sched.update(plan, _refused(stage, plan))
        else:
            updates = sched.update(plan, stage.execute(plan))
        collect(outputs, updates)
        errors.update((u.seq_id, u.error) for u in updates if u.error)
    assert not sched.has_unfinished()
    assert shared > MAX_ROOM_REFUSALS  # the short one was refused with it every time
    assert list(errors) == [long_id]
    assert outputs.get(short_id) == expected[0]
    flush(sched, stage)


def test_refusals_count_again_from_each_token_the_sequence_gets() -> None:
    """A long generation on a busy swarm may be refused now and then over its life: once
    a stage had room for all of it (a token came back), its earlier refusals no longer
    say that it does not fit."""
    sched = make_scheduler()
    stage = FakeStage(sched)
    (seq_id,) = sched.add_request("r", SHORT_PROMPT, params(max_tokens=3))
    outputs: dict[int, list[int]] = {}
    errors: list[str] = []
    refusals = 0
    for _ in range(400):
        if not sched.has_unfinished():
            break
        plan = sched.schedule()
        if plan.is_empty:
            stage.execute(plan)
            continue
        tokens = len(outputs.get(seq_id, []))
        if refusals < (tokens + 1) * (MAX_ROOM_REFUSALS - 2):  # 14 refusals per token
            refusals += 1
            updates = sched.update(plan, _refused(stage, plan))
        else:
            updates = sched.update(plan, stage.execute(plan))
        collect(outputs, updates)
        errors += [u.error for u in updates if u.error]
    assert errors == []
    assert refusals > MAX_ROOM_REFUSALS
    assert len(outputs[seq_id]) == 3
    flush(sched, stage)
