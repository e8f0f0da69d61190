"""Replay after a lost node: sequences restart from their tokens and produce the same ones."""

from __future__ import annotations

from molink.scheduler.scheduler import MAX_REPLAYS
from molink.step import FailureKind, StepResult
from tests.unit.test_scheduler_helpers import (
    FakeStage,
    collect,
    drive,
    flush,
    make_scheduler,
    params,
    run_to_completion,
    step,
)


def _requests(sched, count: int = 3, max_tokens: int = 12) -> list[int]:
    ids = []
    for index in range(count):
        ids += sched.add_request(
            f"r{index}", list(range(100 + index, 107 + index)), params(max_tokens=max_tokens)
        )
    return ids


def _reference(count: int = 3, max_tokens: int = 12) -> dict[int, list[int]]:
    sched = make_scheduler()
    _requests(sched, count, max_tokens)
    return run_to_completion(sched, FakeStage(sched))


def test_replayed_idle_sequences_continue_with_the_same_tokens() -> None:
    sched = make_scheduler()
    stage = FakeStage(sched)
    seq_ids = _requests(sched)
    outputs: dict[int, list[int]] = {}
    for _ in range(5):
        collect(outputs, step(sched, stage)[1])
    before = {s: list(outputs[s]) for s in seq_ids}
    tokens_held = sum(sched.get_sequence(s).num_tokens for s in seq_ids)
    sched.replay(seq_ids)
    assert sched.num_replayed_sequences == 3 and sched.num_replayed_tokens == tokens_held
    assert sched.num_running == 0 and sched.num_waiting == 3
    resent = {}
    for plan, updates in drive(sched, stage):
        collect(outputs, updates)
        for new in plan.new_sequences:
            resent.setdefault(new.seq_id, new)
    # Sent again with every token so far: the prompt and what was generated.
    for seq_id in seq_ids:
        assert resent[seq_id].token_ids[resent[seq_id].num_prompt_tokens :] == tuple(before[seq_id])
    flush(sched, stage)
    assert outputs == _reference()


def test_a_plan_failed_by_a_lost_node_is_replayed_not_failed() -> None:
    sched = make_scheduler()
    stage = FakeStage(sched)
    _requests(sched)
    outputs: dict[int, list[int]] = {}
    for _ in range(4):
        collect(outputs, step(sched, stage)[1])
    plan = sched.schedule()
    stage.execute(plan)  # ran, but its result never came back
    failed = StepResult(
        plan.step_id,
        micro_batch=plan.micro_batch,
        error="node b unreachable",
        failure_kind=FailureKind.UNREACHABLE,
        failed_node_id="b",
    )
    assert sched.update(plan, failed) == []  # no sequence fails
    assert sched.num_replayed_sequences == len(plan.scheduled)
    for _, updates in drive(sched, stage):
        collect(outputs, updates)
    flush(sched, stage)
    assert outputs == _reference()


def test_a_sequence_in_flight_is_replayed_when_its_plan_returns() -> None:
    sched = make_scheduler()
    stage = FakeStage(sched)
    seq_ids = _requests(sched)
    outputs: dict[int, list[int]] = {}
    for _ in range(3):
        collect(outputs, step(sched, stage)[1])
    plan = sched.schedule()
    sched.replay(seq_ids)  # the node is lost while the plan is out
    assert sched.num_replayed_sequences == 0
    collect(outputs, sched.update(plan, stage.execute(plan)))  # its tokens still count
    assert sched.num_replayed_sequences == 3 and sched.num_waiting == 3
    for _, updates in drive(sched, stage):
        collect(outputs, updates)
    flush(sched, stage)
    assert outputs == _reference()


def test_a_sequence_failing_every_time_ends_with_an_error() -> None:
    sched = make_scheduler()
    stage = FakeStage(sched)
    (seq_id,) = sched.add_request("r", [5, 6, 7], params(max_tokens=4))
    errors = []
    failures = 0
    for _ in range(3 * MAX_REPLAYS):  # a replay is sent again once its release went out
        plan = sched.schedule()
        stage.execute(plan)
        if plan.is_empty:
            continue
        failures += 1
        failed = StepResult(plan.step_id, error="node c refused", failure_kind=FailureKind.REJECTED)
        errors += [u.error for u in sched.update(plan, failed) if u.error]
    assert failures == MAX_REPLAYS + 1
    assert len(errors) == 1 and "after 8 replays" in errors[0]
    assert sched.get_sequence(seq_id) is None or sched.get_sequence(seq_id).is_finished
    flush(sched, stage)


def test_a_failure_of_unknown_kind_still_fails_the_plan() -> None:
    sched = make_scheduler()
    stage = FakeStage(sched)
    sched.add_request("r", [5, 6, 7], params(max_tokens=4))
    plan = sched.schedule()
    stage.execute(plan)
    updates = sched.update(plan, StepResult(plan.step_id, error="boom"))
    assert [u.finish_reason for u in updates] == ["error"]
    flush(sched, stage)
