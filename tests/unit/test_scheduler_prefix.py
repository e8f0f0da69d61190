"""Prefix caching through the scheduler, hash collisions, and n > 1 sharing the prompt."""

from __future__ import annotations

from molink.kv_cache import hashing
from molink.scheduler.sequence import derive_seed
from tests.unit.test_scheduler_helpers import (
    FakeStage,
    collect,
    flush,
    make_scheduler,
    params,
    run_to_completion,
    step,
)


def prompt(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def test_second_request_hits_the_first_prompts_blocks():
    sched = make_scheduler(block_size=4)
    stage = FakeStage(sched)
    (a,) = sched.add_request("a", prompt(10), params(max_tokens=4))
    step(sched, stage)
    (b,) = sched.add_request("b", prompt(10) + [7, 7], params(max_tokens=4))
    plan, _ = step(sched, stage)
    entry = next(s for s in plan.scheduled if s.seq_id == b)
    assert entry.num_computed_tokens == 8 and entry.num_new_tokens == 4
    table_a, table_b = sched.kv.block_table(a), sched.kv.block_table(b)
    assert list(table_b[:2]) == list(table_a[:2])
    assert entry.new_block_ids == tuple(table_b)  # hit blocks are sent too
    run_to_completion(sched, stage)


def test_block_aligned_prompt_still_recomputes_its_last_token():
    sched = make_scheduler(block_size=4)
    stage = FakeStage(sched)
    sched.add_request("a", prompt(8), params(max_tokens=1))
    step(sched, stage)
    (b,) = sched.add_request("b", prompt(8), params(max_tokens=1))
    plan, updates = step(sched, stage)
    assert (plan.scheduled[0].num_computed_tokens, plan.scheduled[0].num_new_tokens) == (4, 4)
    assert plan.scheduled[0].sample and updates[0].seq_id == b
    flush(sched, stage)


def test_prefix_caching_does_not_change_outputs():
    shared = prompt(9)
    requests = [shared + [1, 2, 3], shared + [4, 5], shared, prompt(6, 700), shared + [1, 2]]

    def run(enable: bool) -> list[list[int]]:
        sched = make_scheduler(num_blocks=24, enable_prefix_caching=enable)
        stage = FakeStage(sched)
        ids, outputs = [], {}
        for i, tokens in enumerate(requests):
            ids.append(sched.add_request(f"r{i}", tokens, params(max_tokens=5))[0])
            collect(outputs, step(sched, stage)[1])
        outputs.update(
            {k: outputs.get(k, []) + v for k, v in run_to_completion(sched, stage).items()}
        )
        return [outputs[i] for i in ids]

    assert run(True) == run(False)


def test_forced_hash_collisions_never_give_wrong_kv(monkeypatch):
    """Every block hashes alike: the token/parent checks must keep each hit exact."""
    monkeypatch.setattr(hashing, "hash_block_tokens", lambda parent, tokens: 7)
    requests = [prompt(9), prompt(9, 300), prompt(9), [1, 1, 1, 1] + prompt(5), prompt(12)]
    sched = make_scheduler(num_blocks=20)
    stage = FakeStage(sched)  # checks the KV every sequence reads
    ids, outputs, starts = [], {}, []
    for i, tokens in enumerate(requests):
        ids.append(sched.add_request(f"r{i}", tokens, params(max_tokens=4))[0])
        plan, updates = step(sched, stage)
        collect(outputs, updates)
        starts += [s.num_computed_tokens for s in plan.scheduled if s.seq_id == ids[-1]]
    assert starts == [0, 0, 4, 0, 4]  # real hits happen despite the collisions
    for k, v in run_to_completion(sched, stage).items():
        outputs.setdefault(k, []).extend(v)
    monkeypatch.undo()
    clean = make_scheduler(num_blocks=20, enable_prefix_caching=False)
    clean_ids = [
        clean.add_request(f"r{i}", t, params(max_tokens=4))[0] for i, t in enumerate(requests)
    ]
    expected = run_to_completion(clean, FakeStage(clean))
    assert [outputs[i] for i in ids] == [expected[i] for i in clean_ids]


def test_siblings_wait_for_the_prompt_then_share_its_blocks():
    sched = make_scheduler(block_size=4, max_num_batched_tokens=6)
    stage = FakeStage(sched)
    ids = sched.add_request("r", prompt(10), params(n=3, max_tokens=3, seed=5))
    first, *siblings = ids
    assert sched.num_waiting == 3
    plan, _ = step(sched, stage)  # first chunk of the prompt only
    assert [s.seq_id for s in plan.scheduled] == [first] and sched.num_waiting == 2
    plan, _ = step(sched, stage)  # rest of the prompt; siblings still held
    assert [s.seq_id for s in plan.scheduled] == [first] and plan.scheduled[0].sample
    plan, _ = step(sched, stage)
    entries = {s.seq_id: s for s in plan.scheduled}
    assert set(entries) == set(ids)
    prompt_blocks = list(sched.kv.block_table(first)[:2])
    for sibling in siblings:
        assert entries[sibling].num_computed_tokens == 8  # only the tail is recomputed
        assert list(sched.kv.block_table(sibling)[:2]) == prompt_blocks
    seeds = {n.seq_id: n.sampling.seed for n in plan.new_sequences}
    assert seeds == {sib: derive_seed(5, i + 1) for i, sib in enumerate(siblings)}
    assert len({5, *seeds.values()}) == 3
    run_to_completion(sched, stage)


def test_derived_seeds_are_deterministic_and_distinct():
    assert derive_seed(123, 0) == 123
    assert derive_seed(123, 1) == derive_seed(123, 1)
    seeds = {derive_seed(seed, i) for seed in range(50) for i in range(1, 20)}
    assert len(seeds) == 50 * 19
    assert all(0 <= s < 2**63 for s in seeds)


def test_unseeded_siblings_stay_unseeded():
    sched = make_scheduler()
    stage = FakeStage(sched)
    sched.add_request("r", prompt(5), params(n=2))
    new = [n for _ in range(2) for n in step(sched, stage)[0].new_sequences]
    assert [n.sampling.seed for n in new] == [None, None]
    run_to_completion(sched, stage)


def test_siblings_are_not_held_without_prefix_caching():
    sched = make_scheduler(enable_prefix_caching=False)
    stage = FakeStage(sched)
    ids = sched.add_request("r", prompt(5), params(n=3, max_tokens=2))
    plan, _ = step(sched, stage)
    assert [s.seq_id for s in plan.scheduled] == ids
    outputs = run_to_completion(sched, stage)
    assert set(outputs) == set(ids)
