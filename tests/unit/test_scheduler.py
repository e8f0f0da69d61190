"""Scheduler: validation, continuous batching, token budget, chunked prefill, admission."""

from __future__ import annotations

import pytest

from molink.errors import ContextLengthExceededError, InvalidParameterError, OutOfCapacityError
from tests.unit.test_scheduler_helpers import (
    FakeStage,
    assert_all_free,
    collect,
    drive,
    flush,
    make_scheduler,
    params,
    run_to_completion,
    step,
)


def prompt(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


# -- validation ----------------------------------------------------------------------------


def test_empty_prompt_is_rejected():
    with pytest.raises(InvalidParameterError) as info:
        make_scheduler().add_request("r", [], params())
    assert info.value.field == "prompt"


def test_prompt_at_or_over_context_length_is_rejected_with_the_limit():
    sched = make_scheduler(max_model_len=32)
    with pytest.raises(ContextLengthExceededError, match="32") as info:
        sched.add_request("r", prompt(32), params())
    assert info.value.max_model_len == 32
    sched.add_request("ok", prompt(31), params(max_tokens=1))


def test_prompt_plus_max_tokens_over_context_length_is_rejected():
    sched = make_scheduler(max_model_len=32)
    with pytest.raises(ContextLengthExceededError) as info:
        sched.add_request("r", prompt(20), params(max_tokens=13))
    assert info.value.field == "max_tokens"
    assert sched.num_waiting == 0


def test_request_larger_than_the_whole_cache_is_rejected():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    with pytest.raises(OutOfCapacityError, match="16"):
        sched.add_request("r", prompt(10), params(max_tokens=8))
    sched.add_request("fits", prompt(10), params(max_tokens=7))  # 16 KV tokens
    with pytest.raises(OutOfCapacityError):
        sched.add_request("long", prompt(17), params(max_tokens=None))


def test_duplicate_request_id_and_bad_budget_are_rejected():
    sched = make_scheduler()
    sched.add_request("r", prompt(4), params())
    with pytest.raises(InvalidParameterError):
        sched.add_request("r", prompt(4), params())
    with pytest.raises(InvalidParameterError):
        sched.schedule(token_budget=-1)


def test_max_tokens_none_runs_to_the_context_length():
    sched = make_scheduler(max_model_len=20)
    stage = FakeStage(sched)
    (seq_id,) = sched.add_request("r", prompt(12), params(max_tokens=None))
    outputs = run_to_completion(sched, stage)
    assert len(outputs[seq_id]) == 8


def test_max_tokens_none_is_capped_by_the_cache_capacity():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    stage = FakeStage(sched)
    (seq_id,) = sched.add_request("r", prompt(10), params(max_tokens=None))
    updates = []
    for _ in range(20):
        if not sched.has_unfinished():
            break
        updates += step(sched, stage)[1]
    assert len([u for u in updates if u.new_token_id is not None]) == 7  # 10 + 7 - 1 = 16
    assert updates[-1].finish_reason == "length"
    flush(sched, stage)


# -- a request's life ----------------------------------------------------------------------


def test_single_request_prefills_then_decodes_and_frees_everything():
    sched = make_scheduler()
    stage = FakeStage(sched)
    (seq_id,) = sched.add_request("r", prompt(10), params(max_tokens=4))
    plan, updates = step(sched, stage)
    assert [n.seq_id for n in plan.new_sequences] == [seq_id]
    assert plan.new_sequences[0].token_ids == tuple(prompt(10))
    (sched_seq,) = plan.scheduled
    assert (sched_seq.num_computed_tokens, sched_seq.num_new_tokens) == (0, 10)
    assert sched_seq.sample and sched_seq.new_block_ids == (0, 1, 2)
    assert updates[0].new_token_id is not None and updates[0].finish_reason is None
    assert updates[0].logprob == -0.5 and updates[0].request_id == "r"
    plan, updates = step(sched, stage)
    assert plan.new_sequences == () and plan.scheduled[0].num_new_tokens == 1
    assert plan.scheduled[0].num_computed_tokens == 10
    plan, updates = step(sched, stage)
    assert plan.scheduled[0].new_block_ids == ()
    plan, updates = step(sched, stage)
    assert plan.scheduled[0].new_block_ids == (3,)  # position 12 opens a new block
    assert updates[0].finish_reason == "length"
    assert sched.get_sequence(seq_id) is None and sched.request_id_of(seq_id) is None
    plan = sched.schedule()
    assert plan.is_empty and plan.finished_seq_ids == (seq_id,)
    stage.execute(plan)
    assert sched.schedule().finished_seq_ids == ()  # sent once
    assert_all_free(sched)


def test_new_requests_join_while_others_decode():
    sched = make_scheduler()
    stage = FakeStage(sched)
    (a,) = sched.add_request("a", prompt(6), params(max_tokens=6))
    step(sched, stage)
    step(sched, stage)
    (b,) = sched.add_request("b", prompt(5, 300), params(max_tokens=2))
    plan, _ = step(sched, stage)
    assert [s.seq_id for s in plan.scheduled] == [a, b]
    assert [s.num_new_tokens for s in plan.scheduled] == [1, 5]
    assert [n.seq_id for n in plan.new_sequences] == [b]
    plan, _ = step(sched, stage)
    assert [s.num_new_tokens for s in plan.scheduled] == [1, 1]
    run_to_completion(sched, stage)


def test_every_plan_respects_the_token_budget():
    sched = make_scheduler(max_num_batched_tokens=10, num_blocks=128)
    stage = FakeStage(sched)
    for i in range(6):
        sched.add_request(f"r{i}", prompt(7, 100 * i), params(max_tokens=5))
    totals = []
    for plan, _ in drive(sched, stage):
        assert 0 < plan.num_tokens <= 10
        totals.append(plan.num_tokens)
    assert max(totals) == 10  # the budget is actually used
    flush(sched, stage)
    sched.add_request("x", prompt(9), params(max_tokens=2))
    assert step(sched, stage, token_budget=4)[0].num_tokens == 4
    assert sched.schedule(token_budget=0).is_empty


def test_long_prompt_is_chunked_alongside_decodes():
    sched = make_scheduler(max_num_batched_tokens=8)
    stage = FakeStage(sched)
    (a,) = sched.add_request("a", prompt(3), params(max_tokens=10))
    step(sched, stage)
    (b,) = sched.add_request("b", prompt(20, 500), params(max_tokens=2))
    chunks = []
    for _ in range(3):
        plan, updates = step(sched, stage)
        assert plan.scheduled[0].seq_id == a and plan.scheduled[0].num_new_tokens == 1
        chunk = plan.scheduled[1]
        chunks.append((chunk.num_computed_tokens, chunk.num_new_tokens, chunk.sample))
        assert plan.token_ids[1:] == tuple(prompt(20, 500))[chunk.num_computed_tokens :][:7]
        if chunk.sample:
            assert any(u.seq_id == b and u.new_token_id is not None for u in updates)
        else:
            assert all(u.seq_id != b for u in updates)
    assert chunks == [(0, 7, False), (7, 7, False), (14, 6, True)]
    assert [n.seq_id for n in plan.new_sequences] == []
    run_to_completion(sched, stage)


def test_long_prefill_token_threshold_caps_each_chunk():
    sched = make_scheduler(max_num_batched_tokens=32, long_prefill_token_threshold=5)
    stage = FakeStage(sched)
    sched.add_request("a", prompt(12), params(max_tokens=1))
    sizes = [step(sched, stage)[0].num_tokens for _ in range(3)]
    assert sizes == [5, 5, 2]
    flush(sched, stage)


# -- admission -------------------------------------------------------------------------------


def test_admission_waits_for_free_blocks_and_keeps_fcfs_order():
    sched = make_scheduler(num_blocks=7, block_size=4, max_num_batched_tokens=64)
    stage = FakeStage(sched)
    (a,) = sched.add_request("a", prompt(20), params(max_tokens=4))  # 5 blocks, 6 at the end
    (b,) = sched.add_request("b", prompt(10, 300), params(max_tokens=2))  # needs 3 blocks
    (c,) = sched.add_request("c", prompt(2, 600), params(max_tokens=2))  # would fit
    plan, _ = step(sched, stage)
    assert [s.seq_id for s in plan.scheduled] == [a]  # c does not jump ahead of b
    assert sched.num_waiting == 2
    seen_b_after_a_finished = False
    outputs: dict[int, list[int]] = {}
    for plan, updates in drive(sched, stage):
        collect(outputs, updates)
        ids = [s.seq_id for s in plan.scheduled]
        if b in ids and a not in ids:
            seen_b_after_a_finished = True
        if c in ids:
            assert b in ids or b in outputs  # c never before b
    assert seen_b_after_a_finished
    flush(sched, stage)


def test_max_num_seqs_limits_running_sequences():
    sched = make_scheduler(max_num_seqs=2)
    stage = FakeStage(sched)
    for i in range(3):
        sched.add_request(f"r{i}", prompt(4, 100 * i), params(max_tokens=3))
    plan, _ = step(sched, stage)
    assert len(plan.scheduled) == 2 and sched.num_running == 2 and sched.num_waiting == 1
    run_to_completion(sched, stage)


def test_outputs_do_not_depend_on_batching():
    """The same requests alone or batched (with chunking) yield the same tokens."""
    requests = [prompt(9, 100), prompt(14, 200), prompt(3, 300)]
    alone = []
    for tokens in requests:
        sched = make_scheduler()
        (seq_id,) = sched.add_request("r", tokens, params(max_tokens=6))
        alone.append(run_to_completion(sched, FakeStage(sched))[seq_id])
    sched = make_scheduler(max_num_batched_tokens=5)
    ids = [sched.add_request(f"r{i}", t, params(max_tokens=6))[0] for i, t in enumerate(requests)]
    batched = run_to_completion(sched, FakeStage(sched))
    assert [batched[i] for i in ids] == alone
