"""Shared fixtures for the scheduler tests: a fake pipeline that checks the plans it runs.

``FakeStage`` mirrors what real stages do with a plan (tables from diffs, token history,
forgetting finished ids) and models KV content exactly: every slot it writes records the
whole token prefix it was computed for, and every step checks that the slots a sequence
attends to hold its own prefix. A wrong block table, a wrong prefix-cache hit or a lost
diff therefore fails the test that caused it.
"""

from __future__ import annotations

from collections.abc import Callable

from molink.config import SchedulerConfig
from molink.kv_cache.manager import KVCacheManager
from molink.sampling_params import SamplingParams
from molink.scheduler.scheduler import Scheduler
from molink.scheduler.sequence import SequenceUpdate
from molink.step import SampledToken, StepPlan, StepResult

EOS = 2
TokenRule = Callable[[int, list[int]], int]


def default_token(seq_id: int, history: list[int]) -> int:
    """Deterministic in the token history (not the seq id), never EOS."""
    return 10 + (sum(history) * 31 + len(history)) % 50


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    max_num_batched_tokens: int = 32,
    max_num_seqs: int = 16,
    max_model_len: int = 256,
    enable_prefix_caching: bool = True,
    long_prefill_token_threshold: int = 0,
) -> Scheduler:
    config = SchedulerConfig(
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        max_model_len=max_model_len,
        long_prefill_token_threshold=long_prefill_token_threshold,
    )
    kv = KVCacheManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(config, kv, (EOS,))


def params(**kwargs) -> SamplingParams:
    kwargs.setdefault("max_tokens", 8)
    return SamplingParams(**kwargs)


class FakeStage:
    """One stage holding every layer; checks each plan against the head's state."""

    def __init__(self, scheduler: Scheduler, token_rule: TokenRule = default_token) -> None:
        self.scheduler = scheduler
        self.block_size = scheduler.kv.block_size
        self.token_rule = token_rule
        self.tables: dict[int, list[int]] = {}
        self.histories: dict[int, list[int]] = {}
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}
        self.forgotten: list[int] = []

    def execute(self, plan: StepPlan) -> StepResult:
        for seq_id in plan.finished_seq_ids:
            assert seq_id in self.tables, f"forgetting unknown sequence {seq_id}"
            del self.tables[seq_id]
            del self.histories[seq_id]
            self.forgotten.append(seq_id)
        for new in plan.new_sequences:
            assert new.seq_id not in self.tables, f"sequence {new.seq_id} sent twice"
            self.tables[new.seq_id] = []
            self.histories[new.seq_id] = list(new.token_ids)
        assert len(plan.token_ids) == plan.num_tokens
        offset = 0
        sampled = []
        for sched in plan.scheduled:
            chunk = plan.token_ids[offset : offset + sched.num_new_tokens]
            offset += sched.num_new_tokens
            self._run_chunk(sched.seq_id, sched.num_computed_tokens, chunk, sched.new_block_ids)
            history = self.histories[sched.seq_id]
            assert sched.sample == (sched.num_computed_tokens + len(chunk) == len(history))
            if sched.sample:
                token = self.token_rule(sched.seq_id, history)
                history.append(token)
                sampled.append(SampledToken(sched.seq_id, token, logprob=-0.5))
        return StepResult(
            step_id=plan.step_id, sampled=tuple(sampled), micro_batch=plan.micro_batch
        )

    def _run_chunk(self, seq_id: int, start: int, chunk: tuple, new_block_ids: tuple) -> None:
        table = self.tables[seq_id]
        table.extend(new_block_ids)
        assert table == list(self.scheduler.kv.block_table(seq_id)), "stage table diverged"
        history = self.histories[seq_id]
        assert tuple(history[start : start + len(chunk)]) == chunk, "wrong tokens scheduled"
        assert start + len(chunk) <= len(table) * self.block_size
        for pos in range(start):  # attention reads the cached prefix
            assert self.slots.get(self._slot(table, pos)) == tuple(history[: pos + 1]), (
                f"sequence {seq_id} reads wrong KV at position {pos}"
            )
        for pos in range(start, start + len(chunk)):
            self.slots[self._slot(table, pos)] = tuple(history[: pos + 1])

    def _slot(self, table: list[int], pos: int) -> tuple[int, int]:
        return table[pos // self.block_size], pos % self.block_size


def step(
    scheduler: Scheduler, stage: FakeStage, micro_batch: int = 0, token_budget: int | None = None
) -> tuple[StepPlan, list[SequenceUpdate]]:
    """schedule -> run -> update, checking integrity around it."""
    plan = scheduler.schedule(micro_batch=micro_batch, token_budget=token_budget)
    scheduler.check_integrity()
    result = stage.execute(plan)
    updates = scheduler.update(plan, result)
    scheduler.check_integrity()
    return plan, updates


def drive(scheduler: Scheduler, stage: FakeStage, max_steps: int = 500):
    """Yield (plan, updates) for each step until nothing is unfinished; fails if stuck."""
    for _ in range(max_steps):
        if not scheduler.has_unfinished():
            return
        yield step(scheduler, stage)
    raise AssertionError(f"still unfinished after {max_steps} steps")


def run_to_completion(
    scheduler: Scheduler, stage: FakeStage, max_steps: int = 500
) -> dict[int, list[int]]:
    """Drive until nothing is unfinished; returns the tokens each sequence generated."""
    outputs: dict[int, list[int]] = {}
    for _, updates in drive(scheduler, stage, max_steps):
        collect(outputs, updates)
    flush(scheduler, stage)
    return outputs


def collect(outputs: dict[int, list[int]], updates: list[SequenceUpdate]) -> None:
    for update in updates:
        if update.new_token_id is not None:
            outputs.setdefault(update.seq_id, []).append(update.new_token_id)


def flush(scheduler: Scheduler, stage: FakeStage) -> None:
    """Deliver pending finished ids, then check that nothing is held anywhere."""
    plan = scheduler.schedule()
    assert plan.is_empty
    stage.execute(plan)
    assert_all_free(scheduler)
    assert stage.tables == {}, f"stages still hold {sorted(stage.tables)}"


def assert_all_free(scheduler: Scheduler) -> None:
    scheduler.check_integrity()
    kv = scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks
    assert kv.num_sequences == 0
    assert scheduler.num_running == 0 and scheduler.num_waiting == 0
