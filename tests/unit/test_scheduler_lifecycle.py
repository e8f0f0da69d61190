"""Stop conditions, aborts, outside finishes, failed steps and a dead pipeline."""

from __future__ import annotations

from molink.step import SampledToken, StepResult
from tests.unit.test_scheduler_helpers import (
    EOS,
    FakeStage,
    assert_all_free,
    default_token,
    flush,
    make_scheduler,
    params,
    run_to_completion,
    step,
)


def prompt(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def scripted(script: list[int]):
    """Every sequence samples ``script`` in order, then default tokens."""

    def rule(seq_id: int, history: list[int]) -> int:
        index = len(history) - 4  # the prompts below are 4 tokens long
        return script[index] if index < len(script) else default_token(seq_id, history)

    return rule


def finish_of(script: list[int], **kwargs) -> tuple[list[int], str | None, object]:
    sched = make_scheduler()
    stage = FakeStage(sched, scripted(script))
    sched.add_request("r", prompt(4), params(**kwargs))
    tokens, last = [], None
    for _ in range(30):
        _, updates = step(sched, stage)
        for update in updates:
            tokens.append(update.new_token_id)
            last = update
        if last is not None and last.finish_reason is not None:
            break
    flush(sched, stage)
    return tokens, last.finish_reason, last.stop_reason


def test_eos_stops():
    assert finish_of([11, EOS, 12], max_tokens=8) == ([11, EOS], "stop", None)


def test_eos_before_min_tokens_does_not_stop():
    result = finish_of([EOS, EOS, 13, EOS], max_tokens=8, min_tokens=2)
    assert result == ([EOS, EOS, 13, EOS], "stop", None)
    tokens, reason, _ = finish_of([EOS, EOS, EOS, 13], max_tokens=8, min_tokens=2)
    assert tokens == [EOS, EOS, EOS] and reason == "stop"


def test_ignore_eos_runs_to_max_tokens():
    assert finish_of([EOS] * 5, max_tokens=4, ignore_eos=True) == ([EOS] * 4, "length", None)


def test_stop_token_ids_stop_with_the_token_as_reason():
    assert finish_of([11, 42, 12], max_tokens=8, stop_token_ids=[42]) == ([11, 42], "stop", 42)
    tokens, reason, stop = finish_of([42, 42], max_tokens=8, stop_token_ids=[42], min_tokens=1)
    assert (tokens, reason, stop) == ([42, 42], "stop", 42)
    result = finish_of([42], max_tokens=8, stop_token_ids=[42], ignore_eos=True)
    assert result == ([42], "stop", 42)


def test_max_tokens_and_context_length_end_with_length():
    assert finish_of([11, 12, 13, 14], max_tokens=3) == ([11, 12, 13], "length", None)
    sched = make_scheduler(max_model_len=7)
    stage = FakeStage(sched)
    (seq_id,) = sched.add_request("r", prompt(4), params(max_tokens=3))
    outputs = run_to_completion(sched, stage)
    assert len(outputs[seq_id]) == 3


# -- abort and outside finishes ----------------------------------------------------------------


def test_abort_waiting_request_never_reaches_the_stages():
    sched = make_scheduler(max_num_seqs=1)
    stage = FakeStage(sched)
    sched.add_request("a", prompt(4), params(max_tokens=4))
    (b,) = sched.add_request("b", prompt(4, 300), params(max_tokens=4))
    step(sched, stage)
    sched.abort_request("b")
    sched.check_integrity()
    assert sched.num_waiting == 0 and sched.get_sequence(b) is None
    run_to_completion(sched, stage)
    assert b not in stage.forgotten


def test_abort_running_request_frees_its_blocks_at_once():
    sched = make_scheduler()
    stage = FakeStage(sched)
    ids = sched.add_request("r", prompt(6), params(n=2, max_tokens=8))
    for _ in range(3):
        step(sched, stage)
    assert sched.num_running == 2
    sched.abort_request("r")
    sched.abort_request("r")  # no-op
    sched.abort_request("unknown")
    sched.check_integrity()
    assert sched.kv.num_sequences == 0 and not sched.has_unfinished()
    plan = sched.schedule()
    assert sorted(plan.finished_seq_ids) == sorted(ids)
    stage.execute(plan)
    assert_all_free(sched)


def test_abort_with_held_siblings():
    sched = make_scheduler()
    stage = FakeStage(sched)
    sched.add_request("r", prompt(6), params(n=4, max_tokens=8))
    sched.abort_request("r")
    sched.check_integrity()
    assert sched.num_waiting == 0 and not sched.has_unfinished()
    flush(sched, stage)


def test_abort_in_flight_request_frees_when_its_plan_returns():
    sched = make_scheduler()
    stage = FakeStage(sched)
    (a,) = sched.add_request("a", prompt(6), params(max_tokens=8))
    plan = sched.schedule()
    result = stage.execute(plan)
    sched.abort_request("a")
    sched.check_integrity()
    assert sched.kv.has_sequence(a) and sched.num_running == 0
    assert sched.schedule(micro_batch=1).finished_seq_ids == ()  # not yet: still in flight
    assert sched.update(plan, result) == []
    sched.check_integrity()
    assert not sched.kv.has_sequence(a)
    assert sched.schedule().finished_seq_ids == (a,)


def test_finish_sequence_from_outside():
    sched = make_scheduler()
    stage = FakeStage(sched)
    a, b = sched.add_request("r", prompt(6), params(n=2, max_tokens=8))
    for _ in range(3):
        step(sched, stage)
    sched.finish_sequence(a, "stop", "the end")
    sched.finish_sequence(a, "stop", "again")  # no-op
    sched.check_integrity()
    assert sched.get_sequence(a).finish_reason == "stop"
    assert sched.get_sequence(a).stop_reason == "the end"
    plan, updates = step(sched, stage)
    assert plan.finished_seq_ids == (a,) and [u.seq_id for u in updates] == [b]
    run_to_completion(sched, stage)


# -- failures ----------------------------------------------------------------------------------


def test_error_result_fails_every_sequence_of_the_plan_only():
    sched = make_scheduler()
    stage = FakeStage(sched)
    a, b = (sched.add_request(r, prompt(5, 100 * i), params())[0] for i, r in enumerate("ab"))
    plan_0 = sched.schedule(micro_batch=0, token_budget=5)
    plan_1 = sched.schedule(micro_batch=1)
    assert [s.seq_id for s in plan_1.scheduled] == [b]
    stage.execute(plan_0)
    updates = sched.update(plan_0, StepResult(step_id=plan_0.step_id, error="stage 2 died"))
    assert [(u.seq_id, u.finish_reason, u.error) for u in updates] == [(a, "error", "stage 2 died")]
    sched.check_integrity()
    assert not sched.kv.has_sequence(a) and sched.kv.has_sequence(b)
    assert [u.seq_id for u in sched.update(plan_1, stage.execute(plan_1))] == [b]
    run_to_completion(sched, stage)


def test_a_missing_token_replays_and_a_mismatched_step_is_an_error():
    sched = make_scheduler()
    stage = FakeStage(sched)
    a, b = (sched.add_request(r, prompt(5, 100 * i), params())[0] for i, r in enumerate("ab"))
    plan = sched.schedule()
    result = stage.execute(plan)
    partial = StepResult(step_id=plan.step_id, sampled=result.sampled[1:])
    updates = sched.update(plan, partial)
    assert [(u.seq_id, u.finish_reason) for u in updates] == [(b, None)]
    assert sched.num_replayed_sequences == 1  # a starts again
    sched.check_integrity()
    plan = sched.schedule()
    stage.execute(plan)
    updates = sched.update(plan, StepResult(step_id=plan.step_id + 7, sampled=()))
    assert [(u.seq_id, u.finish_reason) for u in updates] == [(b, "error")]
    outputs = run_to_completion(sched, stage)
    assert len(outputs[a]) == params().max_tokens


def test_fail_all_frees_everything_and_ignores_late_results():
    sched = make_scheduler(max_num_seqs=2)
    stage = FakeStage(sched)
    for i in range(3):
        sched.add_request(f"r{i}", prompt(9, 100 * i), params(n=2, max_tokens=8))
    step(sched, stage)
    plan = sched.schedule()
    result = stage.execute(plan)
    updates = sched.fail_all("pipeline lost")
    assert len(updates) == 6 and {u.finish_reason for u in updates} == {"error"}
    assert {u.error for u in updates} == {"pipeline lost"}
    assert_all_free(sched)
    assert sched.kv.num_cached_blocks == 0  # the stages' KV is gone too
    assert sched.num_in_flight == 0 and sched.update(plan, result) == []
    assert not sched.has_unfinished()


def test_sampled_token_goes_into_the_next_step_and_logprobs_pass_through():
    sched = make_scheduler()
    (a,) = sched.add_request("a", prompt(4), params(max_tokens=3, logprobs=1))
    plan = sched.schedule()
    token = SampledToken(a, 77, logprob=-1.25)
    (update,) = sched.update(plan, StepResult(step_id=plan.step_id, sampled=(token,)))
    assert update.sampled == token and update.logprob == -1.25 and update.top_logprobs == ()
    assert sched.get_sequence(a).output_token_ids == [77]
    plan = sched.schedule()
    assert plan.token_ids == (77,)
    sched.abort_request("a")
