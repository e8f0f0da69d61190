"""Scheduler limits for transmission scheduling: a prefill token budget and a decode cap."""

from __future__ import annotations

import math

import pytest

from molink.errors import InvalidParameterError
from molink.scheduler.scheduler import Scheduler
from molink.step import StepPlan, StepResult
from tests.unit.test_scheduler_helpers import (
    FakeStage,
    assert_all_free,
    collect,
    make_scheduler,
    params,
    run_to_completion,
)


def prompt(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def decoding(sched: Scheduler, stage: FakeStage, num: int, prompt_len: int = 3) -> list[int]:
    """``num`` sequences past their prefill, each with one token left to decode."""
    ids = [
        sched.add_request(f"d{i}", prompt(prompt_len, 1000 + 10 * i), params(max_tokens=50))[0]
        for i in range(num)
    ]
    plan = sched.schedule()
    sched.update(plan, stage.execute(plan))
    assert all(sched.get_sequence(i).num_uncomputed_tokens == 1 for i in ids)
    return ids


def chunks(plan: StepPlan) -> dict[int, int]:
    return {s.seq_id: s.num_new_tokens for s in plan.scheduled}


def test_prefill_budget_caps_the_chunk_and_decodes_do_not_count_against_it():
    sched = make_scheduler(max_num_batched_tokens=64)
    stage = FakeStage(sched)
    decoders = decoding(sched, stage, 4)
    (long,) = sched.add_request("long", prompt(40), params())
    plan = sched.schedule(prefill_token_budget=8)
    assert chunks(plan) == {**{i: 1 for i in decoders}, long: 8}
    sched.update(plan, stage.execute(plan))
    plan = sched.schedule(prefill_token_budget=12)
    assert chunks(plan)[long] == 12
    sched.update(plan, stage.execute(plan))
    run_to_completion(sched, stage)
    assert_all_free(sched)


def test_zero_prefill_budget_still_schedules_every_decode():
    sched = make_scheduler(max_num_batched_tokens=64)
    stage = FakeStage(sched)
    decoders = decoding(sched, stage, 5)
    sched.add_request("long", prompt(60), params())
    plan = sched.schedule(prefill_token_budget=0)
    assert chunks(plan) == {i: 1 for i in decoders}
    assert plan.new_sequences == ()  # the long prompt was not admitted


def test_prefill_budget_is_shared_by_running_and_waiting_prefills():
    sched = make_scheduler(max_num_batched_tokens=64)
    stage = FakeStage(sched)
    (first,) = sched.add_request("a", prompt(30), params())
    plan = sched.schedule(prefill_token_budget=10)
    sched.update(plan, stage.execute(plan))
    (second,) = sched.add_request("b", prompt(30, 500), params())
    plan = sched.schedule(prefill_token_budget=16)
    assert chunks(plan) == {first: 16}
    sched.update(plan, stage.execute(plan))
    plan = sched.schedule(prefill_token_budget=16)  # a needs 4 more, b takes the rest
    assert chunks(plan) == {first: 4, second: 12}


def test_prefill_budget_larger_than_the_token_budget_changes_nothing():
    sched = make_scheduler(max_num_batched_tokens=16)
    sched.add_request("a", prompt(40), params())
    plan = sched.schedule(prefill_token_budget=1000)
    assert plan.num_tokens == 16


def test_max_decodes_caps_decodes_but_not_prefills():
    sched = make_scheduler(max_num_batched_tokens=64)
    stage = FakeStage(sched)
    decoders = decoding(sched, stage, 6)
    (late,) = sched.add_request("late", prompt(9, 700), params())
    plan = sched.schedule(max_decodes=2)
    assert chunks(plan) == {decoders[0]: 1, decoders[1]: 1, late: 9}
    plan = sched.schedule(micro_batch=1, max_decodes=2)
    assert chunks(plan) == {decoders[2]: 1, decoders[3]: 1}


def test_negative_limits_are_rejected_by_name():
    sched = make_scheduler()
    for name in ("prefill_token_budget", "max_decodes", "token_budget"):
        with pytest.raises(InvalidParameterError) as info:
            sched.schedule(**{name: -1})
        assert info.value.field == name


def test_balanced_micro_batches_split_many_running_sequences_evenly():
    sched = make_scheduler(num_blocks=256, max_num_batched_tokens=128, max_num_seqs=64)
    stage = FakeStage(sched)
    decoding(sched, stage, 40, prompt_len=2)
    num_micro_batches = 3
    cap = math.ceil(sched.num_running / num_micro_batches)
    plans = [sched.schedule(micro_batch=m, max_decodes=cap) for m in range(num_micro_batches)]
    assert [p.num_tokens for p in plans] == [14, 14, 12]
    assert len({s.seq_id for p in plans for s in p.scheduled}) == 40
    unbalanced = make_scheduler(num_blocks=256, max_num_batched_tokens=128, max_num_seqs=64)
    decoding(unbalanced, FakeStage(unbalanced), 40, prompt_len=2)
    assert unbalanced.schedule(micro_batch=0).num_tokens == 40  # the first takes them all
    assert unbalanced.schedule(micro_batch=1).is_empty


def test_pipelined_run_with_limits_gives_the_same_outputs():
    requests = [prompt(3 + (13 * i) % 29, 100 * i) for i in range(10)]
    expected_sched = make_scheduler(num_blocks=128, max_num_batched_tokens=32)
    expected_ids = [
        expected_sched.add_request(f"r{i}", t, params(max_tokens=7))[0]
        for i, t in enumerate(requests)
    ]
    expected = run_to_completion(expected_sched, FakeStage(expected_sched))

    sched = make_scheduler(num_blocks=128, max_num_batched_tokens=32)
    stage = FakeStage(sched)
    ids = [sched.add_request(f"r{i}", t, params(max_tokens=7))[0] for i, t in enumerate(requests)]
    outputs: dict[int, list[int]] = {}
    in_flight: dict[int, tuple[StepPlan, StepResult]] = {}
    for _ in range(500):
        if not sched.has_unfinished() and not in_flight:
            break
        for micro_batch in (1, 0, 2):
            if micro_batch in in_flight:
                collect(outputs, sched.update(*in_flight.pop(micro_batch)))
            cap = math.ceil(sched.num_running / 3) or None
            plan = sched.schedule(micro_batch=micro_batch, prefill_token_budget=4, max_decodes=cap)
            sched.check_integrity()
            assert sum(s.num_new_tokens for s in plan.scheduled if s.num_new_tokens > 1) <= 4
            result = stage.execute(plan)  # an empty plan may still carry finished ids
            if not plan.is_empty:
                in_flight[micro_batch] = (plan, result)
    assert [outputs[i] for i in ids] == [expected[i] for i in expected_ids]
    stage.execute(sched.schedule())
    assert_all_free(sched)
    assert stage.tables == {}


def test_prefill_candidates_skip_decodes_and_in_flight_prefills():
    sched = make_scheduler(max_num_batched_tokens=64)
    stage = FakeStage(sched)
    assert sched.prefill_candidate_ids() == []
    sched.add_request("a", prompt(3), params(max_tokens=20), arrival_time=5.0)
    plan = sched.schedule()
    sched.update(plan, stage.execute(plan))  # a decodes from now on
    assert sched.prefill_candidate_ids() == []
    sched.add_request("b", prompt(40, 300), params(), arrival_time=7.0)
    sched.add_request("c", prompt(40, 600), params(), arrival_time=9.0)
    b, c = sched.seq_ids_of("b")[0], sched.seq_ids_of("c")[0]
    assert sched.prefill_candidate_ids() == [b]  # b heads the queue
    plan_b = sched.schedule(prefill_token_budget=8)  # b part-way, in flight
    assert sched.prefill_candidate_ids() == [c]  # c heads the queue
    sched.update(plan_b, stage.execute(plan_b))
    assert sched.prefill_candidate_ids() == [b, c]  # b idle with prompt left, c waiting
    sched.add_request("d", prompt(4, 900), params())
    assert sched.prefill_candidate_ids() == [b, c]  # only the head of the queue counts


def test_num_decoding_counts_sequences_past_their_prompt_even_in_flight():
    sched = make_scheduler(max_num_batched_tokens=64)
    stage = FakeStage(sched)
    decoding(sched, stage, 3)
    sched.add_request("long", prompt(40, 300), params())
    assert sched.num_decoding == 3
    plan = sched.schedule(prefill_token_budget=8)  # decodes and a prefill chunk in flight
    assert sched.num_decoding == 3
    sched.update(plan, stage.execute(plan))
    assert sched.num_decoding == 3
