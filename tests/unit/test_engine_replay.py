"""The engine replays sequences whose node was lost, and the real model and sampler then
produce exactly the tokens of a run without the failure: greedy, seeded sampling, and
penalties (which must see the whole history again)."""

from __future__ import annotations

import time

from molink.engine.executor import PlanExecutor
from molink.engine.offline import LLM
from molink.engine.recovery import NodeFailure, RecoveryStats
from molink.sampling_params import SamplingParams
from molink.step import FailureKind, StepPlan, StepResult

PARAMS = [
    SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=1.0, seed=11, max_tokens=24, ignore_eos=True),
    SamplingParams(
        temperature=0.8,
        top_p=0.9,
        seed=5,
        presence_penalty=0.5,
        repetition_penalty=1.3,
        max_tokens=24,
        ignore_eos=True,
    ),
    SamplingParams(temperature=0, frequency_penalty=0.7, max_tokens=24, ignore_eos=True),
]
PROMPTS = [[5, 6, 7, 8, 9], [40, 41, 42], [100, 7, 100, 7, 3, 2], [9] * 12]


class LosingExecutor:
    """The local executor, except that the ``lose_at``-th plan is lost with its node: it
    fails (unreachable) and every sequence is reported as having had KV there."""

    def __init__(self, inner: PlanExecutor, lose_at: int) -> None:
        self.inner = inner
        self.lose_at = lose_at
        self.submitted = 0
        self.stats = RecoveryStats()
        self._failures: list[NodeFailure] = []
        self._failed: list[StepResult] = []
        self.resent: list[int] = []

    def submit(self, plan: StepPlan) -> None:
        self.submitted += 1
        if self.submitted > self.lose_at:
            self.resent += [
                n.seq_id for n in plan.new_sequences if len(n.token_ids) > n.num_prompt_tokens
            ]
        if self.submitted != self.lose_at:
            self.inner.submit(plan)
            return
        self._failed.append(
            StepResult(
                plan.step_id,
                micro_batch=plan.micro_batch,
                error="node x could not be reached",
                failure_kind=FailureKind.UNREACHABLE,
                failed_node_id="x",
            )
        )
        lost = tuple(range(len(PROMPTS)))
        self._failures.append(
            NodeFailure("x", FailureKind.UNREACHABLE, "gone", lost, time.monotonic())
        )
        self.stats.note_failover()

    def poll(self, timeout: float) -> list[StepResult]:
        failed, self._failed = self._failed, []
        return failed + self.inner.poll(0.0 if failed else timeout)

    def release(self, seq_ids: list[int]) -> None:
        self.inner.release(seq_ids)

    def readiness(self) -> str | None:
        return self.inner.readiness()

    def close(self) -> None:
        self.inner.close()

    def take_failures(self) -> list[NodeFailure]:
        failures, self._failures = self._failures, []
        return failures

    def recovery_stats(self) -> RecoveryStats:
        return self.stats


def _tokens(llm: LLM) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(PROMPTS, PARAMS)]


def test_replayed_sequences_continue_token_for_token(tiny_model_dir) -> None:
    path = str(tiny_model_dir("llama"))
    reference = _tokens(LLM(model=path, dtype="float32", layer_splits=[2]))

    llm = LLM(model=path, dtype="float32", layer_splits=[2])
    losing = LosingExecutor(llm.engine.executor, lose_at=9)  # mid-generation
    llm.engine.executor = losing
    llm.engine.recovery = losing
    assert _tokens(llm) == reference

    # Every sequence was sent again with its prompt and the tokens generated so far.
    assert sorted(set(losing.resent)) == [0, 1, 2, 3]
    assert losing.stats.replayed_sequences == len(PROMPTS)
    assert losing.stats.replayed_tokens > sum(len(p) for p in PROMPTS)
    lines = "\n".join(losing.stats.metric_lines())
    assert f"molink:failover_recovery_seconds_count {len(PROMPTS)}" in lines
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks
