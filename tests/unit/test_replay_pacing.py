"""Replays share each step with the decodes: after a node is lost, the sequences moved off
it rebuild their KV a compute-bounded chunk per plan, and every plan that carries replay
chunks also carries the decodes of the sequences still running, so those streams never
stop. Checked on the schedule itself (which plan carries what), not on timings."""

from __future__ import annotations

import math
import time

import pytest

from molink.engine.llm_engine import LLMEngine
from molink.engine.pacing import PipelinePacer
from molink.engine.recovery import NodeFailure, RecoveryStats
from molink.engine.transmission import (
    TransmissionConfig,
    TransmissionScheduler,
    replay_token_budget,
    route_seconds_per_token,
)
from molink.errors import InvalidParameterError
from molink.sampling_params import SamplingParams
from molink.step import FailureKind, StepPlan
from tests.helpers.fake_engine import FakeTokenizer
from tests.unit.test_scheduler_helpers import FakeStage, make_scheduler, params
from tests.unit.test_transmission_fakes import (
    FakeClock,
    FakeTelemetry,
    QueuedExecutor,
    link,
    timing,
)

BLOCK_SIZE = 4
TOKEN_BUDGET = 256
# R = 2 x 10 ms compute + (20 + 20) ms / 2 round trips = 40 ms; c = 2 x 0.5 ms per token.
REPLAY_BUDGET = 40
NUM_RUNNING = 4
NUM_MOVED = 4
MOVED_PROMPT = 120


def telemetry() -> FakeTelemetry:
    return FakeTelemetry(
        links=[link("head->s1", math.inf, 0.02), link("s1->head", math.inf, 0.02)],
        timings=[timing("head", 0.01, 0.0005), timing("s1", 0.01, 0.0005)],
    )


class LosingSource:
    """The executor's failover side: reports one lost node naming the moved sequences."""

    def __init__(self) -> None:
        self.stats = RecoveryStats()
        self.pending: list[NodeFailure] = []

    def lose(self, seq_ids: list[int]) -> None:
        self.pending.append(
            NodeFailure("b", FailureKind.UNREACHABLE, "killed", tuple(seq_ids), time.monotonic())
        )
        self.stats.note_failover()

    def take_failures(self) -> list[NodeFailure]:
        failures, self.pending = self.pending, []
        return failures

    def recovery_stats(self) -> RecoveryStats:
        return self.stats


def make_engine(
    enabled: bool, num_micro_batches: int
) -> tuple[LLMEngine, QueuedExecutor, LosingSource]:
    sched = make_scheduler(
        num_blocks=1024,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=TOKEN_BUDGET,
        max_num_seqs=32,
        max_model_len=1024,
        enable_prefix_caching=False,  # as on a pipeline head: replays compute everything
    )
    executor = QueuedExecutor(FakeStage(sched))
    transmission = TransmissionScheduler(
        TransmissionConfig(enabled=enabled), telemetry(), FakeClock()
    )
    transmission.refresh()
    source = LosingSource()
    engine = LLMEngine(
        sched,
        executor,
        FakeTokenizer(),
        num_micro_batches,
        pacer=PipelinePacer(transmission),
        recovery=source,
    )
    return engine, executor, source


def start(engine: LLMEngine) -> tuple[list[int], list[int]]:
    """Running streams and the streams that will be moved, all decoding."""
    for i in range(NUM_RUNNING):
        engine.add_request(f"run{i}", [3 + i, 4, 5], SamplingParams(max_tokens=200))
    for i in range(NUM_MOVED):
        prompt = [10 + (i + j) % 50 for j in range(MOVED_PROMPT)]
        engine.add_request(f"moved{i}", prompt, SamplingParams(max_tokens=200))
    running = [engine.scheduler.seq_ids_of(f"run{i}")[0] for i in range(NUM_RUNNING)]
    moved = [engine.scheduler.seq_ids_of(f"moved{i}")[0] for i in range(NUM_MOVED)]
    for _ in range(500):
        seqs = [engine.scheduler.get_sequence(s) for s in running + moved]
        if all(len(s.token_ids) >= s.num_prompt_tokens + 3 for s in seqs):
            return running, moved
        engine.step()
    raise AssertionError("the streams did not start")


def replay_plans(
    engine: LLMEngine, executor: QueuedExecutor, source: LosingSource, moved: list[int]
) -> list[StepPlan]:
    """Lose the node of ``moved``; the plans submitted until each of them sampled again."""
    lengths = {s: len(engine.scheduler.get_sequence(s).token_ids) for s in moved}
    source.lose(moved)
    first = len(executor.submitted)
    for _ in range(2000):
        engine.step()
        seqs = [engine.scheduler.get_sequence(s) for s in moved]
        # Sampling again means the replay rebuilt its KV (tokens in flight come back first).
        if all(s.num_replays == 1 and len(s.token_ids) > lengths[s.seq_id] + 1 for s in seqs):
            return executor.submitted[first:]
    raise AssertionError("the replays did not finish")


def replay_tokens(plan: StepPlan, moved: list[int]) -> int:
    return sum(
        s.num_new_tokens for s in plan.scheduled if s.seq_id in moved and s.num_new_tokens > 1
    )


def decodes(plan: StepPlan) -> set[int]:
    return {s.seq_id for s in plan.scheduled if s.num_new_tokens == 1}


def test_every_plan_with_replay_chunks_carries_the_running_decodes():
    engine, executor, source = make_engine(enabled=True, num_micro_batches=1)
    running, moved = start(engine)
    plans = replay_plans(engine, executor, source, moved)
    with_replay = [p for p in plans if replay_tokens(p, moved)]
    # 4 x ~125 tokens at most 40 per plan: the replay is spread over many plans...
    assert len(with_replay) >= NUM_MOVED * MOVED_PROMPT // REPLAY_BUDGET
    for plan in with_replay:
        assert replay_tokens(plan, moved) <= REPLAY_BUDGET
        # ...and each of them advances every running stream by a token.
        assert set(running) <= decodes(plan), plan
    # Each running stream got a token from every plan while the replays were pending.
    for seq_id in running:
        assert all(seq_id in decodes(p) for p in plans)


def test_with_several_micro_batches_no_running_stream_waits_a_round():
    engine, executor, source = make_engine(enabled=True, num_micro_batches=2)
    running, moved = start(engine)
    plans = replay_plans(engine, executor, source, moved)
    assert all(replay_tokens(p, moved) <= REPLAY_BUDGET for p in plans)
    for seq_id in running:  # each stream's decode is in one of any two consecutive plans
        carried = [i for i, p in enumerate(plans) if seq_id in decodes(p)]
        gaps = [b - a for a, b in zip([-1, *carried], [*carried, len(plans)], strict=False)]
        assert max(gaps) <= 2, (seq_id, carried)


def test_without_pacing_a_replay_takes_whole_steps():
    """The baseline the budget prevents: replay chunks fill the token budget."""
    engine, executor, source = make_engine(enabled=False, num_micro_batches=1)
    _, moved = start(engine)
    plans = replay_plans(engine, executor, source, moved)
    assert max(replay_tokens(p, moved) for p in plans) > TOKEN_BUDGET // 2


def test_replay_budget_is_share_of_a_decode_round_trip_in_compute():
    assert route_seconds_per_token(telemetry().timings) == pytest.approx(0.001)
    assert route_seconds_per_token([timing("head", 0.01)]) is None
    assert replay_token_budget(0.04, 0.001, 1.0, 4, 256) == REPLAY_BUDGET
    assert replay_token_budget(0.04, 0.001, 0.5, 4, 256) == 20
    assert replay_token_budget(0.001, 0.001, 1.0, 16, 256) == 16  # at least a block
    assert replay_token_budget(10.0, 0.001, 1.0, 16, 256) == 256  # at most the step
    assert replay_token_budget(0.04, None, 1.0, 16, 256) == 64  # unmeasured: 4 blocks
    with pytest.raises(InvalidParameterError, match="replay_share"):
        TransmissionConfig(replay_share=0).validate()


def test_scheduler_bounds_replay_chunks_only():
    sched = make_scheduler(num_blocks=256, max_num_batched_tokens=64)
    fresh = sched.add_request("fresh", list(range(1, 41)), params())[0]
    moved = sched.add_request("moved", list(range(1, 41)), params())[0]
    sched.get_sequence(moved).num_replays = 1  # as if moved off a lost node
    plan = sched.schedule(replay_token_budget=8)
    chunks = {s.seq_id: s.num_new_tokens for s in plan.scheduled}
    assert chunks == {fresh: 40, moved: 8}
    with pytest.raises(InvalidParameterError, match="replay_token_budget"):
        sched.schedule(replay_token_budget=-1)
