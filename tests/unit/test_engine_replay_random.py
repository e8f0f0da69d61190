"""Random runs of the engine with aborts, plans in flight delivered out of order, lost
plans (their failure reported at once or some steps later) and node failures reported
while a plan is out or after it came back (seeded, so each run is the same every time): at
the end every request, record and block is gone, and no more recoveries were observed
than sequences replayed."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from molink.engine.llm_engine import LLMEngine
from molink.engine.recovery import NodeFailure
from molink.sampling_params import SamplingParams
from molink.step import FailureKind, StepPlan, StepResult
from tests.helpers.fake_engine import FakeTokenizer
from tests.unit.test_engine_state_ownership import HeldExecutor
from tests.unit.test_scheduler_helpers import FakeStage, make_scheduler


class SurvivorStage(FakeStage):
    """A surviving node: a release for a sequence it no longer holds frees nothing."""

    def execute(self, plan: StepPlan) -> StepResult:
        known = tuple(s for s in plan.finished_seq_ids if s in self.tables)
        return super().execute(dataclasses.replace(plan, finished_seq_ids=known))


def _random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        n=rng.choice([1, 2]),
        temperature=0.0,
        max_tokens=rng.randint(2, 8),
        ignore_eos=rng.random() < 0.5,
    )


def _noticed_now(executor: HeldExecutor) -> int:
    """The first step not yet submitted (a failure noticed now names it)."""
    return max(p.step_id for p in executor.submitted) + 1


def _late_failure(executor: HeldExecutor, rng: random.Random) -> None:
    """A plan comes back, and then its node is reported lost (with one more sequence)."""
    step_id = rng.choice(list(executor.held))
    plan = next(p for p in executor.submitted if p.step_id == step_id)
    executor.deliver(step_id)
    seq_ids = tuple(s.seq_id for s in plan.scheduled) + (rng.randint(0, 60),)
    executor.failures.append(
        NodeFailure(
            "y", FailureKind.UNREACHABLE, "gone", seq_ids, time.monotonic(), _noticed_now(executor)
        )
    )


def _failure_while_out(executor: HeldExecutor, rng: random.Random) -> None:
    """A node of a plan's route is reported lost while the plan is still out."""
    step_id = rng.choice(list(executor.held))
    plan = next(p for p in executor.submitted if p.step_id == step_id)
    seq_ids = tuple(s.seq_id for s in plan.scheduled)
    executor.failures.append(
        NodeFailure(
            "z", FailureKind.UNREACHABLE, "gone", seq_ids, time.monotonic(), _noticed_now(executor)
        )
    )


def _lost_reported_later(executor: HeldExecutor, rng: random.Random, later: list) -> None:
    """A plan is lost with its node; the report of the loss comes a few steps later."""
    executor.lose(rng.choice(list(executor.held)))
    later.append([rng.randint(1, 4), executor.failures.pop()])


def _report_due(executor: HeldExecutor, later: list) -> None:
    for entry in later:
        entry[0] -= 1
        if entry[0] == 0:
            executor.failures.append(entry[1])
    later[:] = [entry for entry in later if entry[0] > 0]


@pytest.mark.parametrize("seed", range(40))
def test_a_random_run_leaves_nothing_behind(seed: int) -> None:
    rng = random.Random(seed)
    scheduler = make_scheduler(num_blocks=rng.choice([16, 64]), max_num_batched_tokens=16)
    stage = SurvivorStage(scheduler, token_rule=lambda _s, _h: rng.choice([1, *range(70, 80)]))
    executor = HeldExecutor(stage)
    engine = LLMEngine(
        scheduler, executor, FakeTokenizer(), rng.choice([1, 2, 3]), recovery=executor
    )
    num_requests = 0
    later: list = []  # [steps until reported, failure]
    for _ in range(200):
        roll = rng.random()
        if roll < 0.12:
            prompt = [rng.randint(70, 80) for _ in range(rng.randint(1, 9))]
            engine.add_request(f"r{num_requests}", prompt, _random_params(rng))
            num_requests += 1
        elif roll < 0.16 and num_requests:
            engine.abort_request(f"r{rng.randrange(num_requests)}")
        elif roll < 0.175 and executor.held:
            executor.lose(rng.choice(list(executor.held)))
        elif roll < 0.19 and executor.held:
            _lost_reported_later(executor, rng, later)
        elif roll < 0.22 and executor.held:
            _late_failure(executor, rng)
        elif roll < 0.26 and executor.held:
            _failure_while_out(executor, rng)
        elif roll < 0.6 and executor.held:
            executor.deliver(rng.choice(list(executor.held)))
        _report_due(executor, later)
        engine.step()
        scheduler.check_integrity()
    for _ in range(1000):
        if not engine.has_unfinished_requests() and not later:
            break
        executor.deliver_all()
        _report_due(executor, later)
        engine.step()
    assert not engine.has_unfinished_requests()
    engine.step()  # the last releases
    assert engine._replayed_at == {} and engine._failed_at == {}
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_total_blocks
    assert not scheduler.has_unfinished() and scheduler.num_in_flight == 0
    stats = executor.stats
    lines = "\n".join(stats.metric_lines())
    observed = int(lines.split("molink:failover_recovery_seconds_count ")[1].split()[0])
    assert observed <= stats.replayed_sequences
