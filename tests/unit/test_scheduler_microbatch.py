"""Several plans in flight: disjoint plans, out-of-order updates, in-flight sequences untouched."""

from __future__ import annotations

import random

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


def run_pipelined(
    sched: Scheduler,
    stage: FakeStage,
    update_order: list[int],
    token_budget: int | None = None,
    max_rounds: int = 400,
) -> tuple[dict[int, list[int]], int]:
    """Keep one plan per micro-batch in flight and update them in ``update_order``.

    Checks on every plan: disjoint from the plans in flight, and never forgets (preempts)
    a sequence that another plan holds. Returns outputs and the number of preemptions.
    """
    in_flight: dict[int, tuple[StepPlan, StepResult]] = {}
    outputs: dict[int, list[int]] = {}
    num_preempted = 0

    def submit(micro_batch: int) -> None:
        nonlocal num_preempted
        plan = sched.schedule(micro_batch=micro_batch, token_budget=token_budget)
        sched.check_integrity()
        held = {s.seq_id for p, _ in in_flight.values() for s in p.scheduled}
        assert not held & {s.seq_id for s in plan.scheduled}, "plans overlap"
        assert not held & set(plan.finished_seq_ids), "an in-flight sequence was dropped"
        num_preempted += sum(sched.get_sequence(i) is not None for i in plan.finished_seq_ids)
        in_flight[micro_batch] = (plan, stage.execute(plan))

    for micro_batch in sorted(set(update_order)):
        submit(micro_batch)
    for _ in range(max_rounds):
        if not sched.has_unfinished():
            break
        for micro_batch in update_order:
            plan, result = in_flight.pop(micro_batch)
            collect(outputs, sched.update(plan, result))
            sched.check_integrity()
            submit(micro_batch)
    assert not sched.has_unfinished()
    for plan, result in in_flight.values():
        assert sched.update(plan, result) == []
    stage.execute(sched.schedule())
    assert_all_free(sched)
    assert stage.tables == {}
    return outputs, num_preempted


def requests() -> list[list[int]]:
    return [prompt(3 + (7 * i) % 11, 100 * i) for i in range(8)]


def test_three_micro_batches_give_the_same_outputs_as_one():
    sched = make_scheduler(num_blocks=64)
    ids = [sched.add_request(f"r{i}", t, params(max_tokens=6))[0] for i, t in enumerate(requests())]
    pipelined, _ = run_pipelined(sched, FakeStage(sched), update_order=[2, 0, 1], token_budget=8)
    single = make_scheduler(num_blocks=64)
    single_ids = [
        single.add_request(f"r{i}", t, params(max_tokens=6))[0] for i, t in enumerate(requests())
    ]
    expected = run_to_completion(single, FakeStage(single))
    assert [pipelined[i] for i in ids] == [expected[i] for i in single_ids]


def test_tight_cache_with_plans_in_flight_preempts_only_idle_sequences():
    sched = make_scheduler(num_blocks=9, block_size=4)
    ids = [
        sched.add_request(f"r{i}", t, params(max_tokens=10))[0] for i, t in enumerate(requests())
    ]
    outputs, num_preempted = run_pipelined(sched, FakeStage(sched), update_order=[1, 0])
    assert num_preempted > 0
    assert all(len(outputs[i]) == 10 for i in ids)


def test_sequence_waits_when_the_only_victim_is_in_flight():
    sched = make_scheduler(num_blocks=4, block_size=4)
    stage = FakeStage(sched)
    (x,) = sched.add_request("x", prompt(5), params(max_tokens=8))

    def run(plan: StepPlan) -> StepResult:
        sched.check_integrity()
        return stage.execute(plan)

    plan_a = sched.schedule(micro_batch=0)
    sched.update(plan_a, run(plan_a))
    plan_b = sched.schedule(micro_batch=0)  # x decodes position 5, in flight
    result_b = run(plan_b)
    (y,) = sched.add_request("y", prompt(8, 300), params(max_tokens=4))
    plan_c = sched.schedule(micro_batch=1)  # y's prefill takes the last two blocks
    assert [s.seq_id for s in plan_c.scheduled] == [y]
    result_c = run(plan_c)
    sched.update(plan_b, result_b)
    for _ in range(2):  # positions 6 and 7 fit in x's blocks
        plan = sched.schedule(micro_batch=0)
        sched.update(plan, run(plan))
    plan_f = sched.schedule(micro_batch=0)  # x needs a block; y is in flight
    assert plan_f.is_empty and plan_f.finished_seq_ids == ()
    assert sched.num_running == 2 and sched.get_sequence(y).is_in_flight
    sched.update(plan_c, result_c)
    plan_g = sched.schedule(micro_batch=1)  # now y is idle and newer: it yields
    assert [s.seq_id for s in plan_g.scheduled] == [x]
    assert plan_g.finished_seq_ids == (y,)
    sched.update(plan_g, run(plan_g))
    run_to_completion(sched, stage)


def test_update_may_come_in_any_order():
    sched = make_scheduler()
    stage = FakeStage(sched)
    (a,) = sched.add_request("a", prompt(5), params(max_tokens=3))
    plan_a = sched.schedule(micro_batch=0)
    (b,) = sched.add_request("b", prompt(6, 300), params(max_tokens=3))
    plan_b = sched.schedule(micro_batch=1)
    assert [s.seq_id for s in plan_a.scheduled] == [a]
    assert [s.seq_id for s in plan_b.scheduled] == [b]
    assert sched.schedule(micro_batch=2).is_empty  # everything is in flight
    assert sched.num_in_flight == 2 and sched.num_in_flight_sequences == 2
    result_a, result_b = stage.execute(plan_a), stage.execute(plan_b)
    assert [u.seq_id for u in sched.update(plan_b, result_b)] == [b]
    assert [u.seq_id for u in sched.update(plan_a, result_a)] == [a]
    sched.check_integrity()
    assert sched.num_in_flight == 0
    run_to_completion(sched, stage)


def test_randomized_traffic_keeps_every_invariant():
    """Arrivals, n > 1, shared prefixes, aborts, stops and a tight cache, two micro-batches."""
    rng = random.Random(1234)
    sched = make_scheduler(num_blocks=24, block_size=4, max_num_batched_tokens=12)
    stage = FakeStage(sched)
    shared = prompt(6, 900)
    in_flight: dict[int, tuple[StepPlan, StepResult]] = {}
    num_requests = 0
    for round_index in range(300):
        if num_requests < 40 and rng.random() < 0.4:
            tokens = (shared if rng.random() < 0.5 else []) + prompt(rng.randint(1, 9), 50)
            kwargs = {"n": rng.choice([1, 1, 2, 3]), "max_tokens": rng.randint(1, 10)}
            sched.add_request(f"r{num_requests}", tokens, params(**kwargs, stop_token_ids=[33]))
            num_requests += 1
        if num_requests and rng.random() < 0.05:
            sched.abort_request(f"r{rng.randrange(num_requests)}")
        micro_batch = round_index % 2
        if micro_batch in in_flight:
            plan, result = in_flight.pop(micro_batch)
            sched.update(plan, result)
        sched.check_integrity()
        plan = sched.schedule(micro_batch=micro_batch)
        sched.check_integrity()
        in_flight[micro_batch] = (plan, stage.execute(plan))
        if num_requests == 40 and not sched.has_unfinished():
            break
    assert num_requests == 40 and not sched.has_unfinished()
    for plan, result in in_flight.values():
        sched.update(plan, result)
    stage.execute(sched.schedule())
    assert_all_free(sched)
    assert stage.tables == {}
