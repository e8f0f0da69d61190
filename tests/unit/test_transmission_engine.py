"""The engine with a pacer: decodes keep flowing while a long prompt streams in chunks."""

from __future__ import annotations

from molink.engine.llm_engine import LLMEngine
from molink.engine.pacing import PipelinePacer
from molink.engine.transmission import (
    TransmissionConfig,
    TransmissionScheduler,
    prefill_tokens_of,
)
from molink.sampling_params import SamplingParams
from molink.step import StepPlan
from tests.helpers.fake_engine import FakeTokenizer
from tests.unit.test_scheduler_helpers import FakeStage, make_scheduler
from tests.unit.test_transmission_fakes import (
    FakeClock,
    FakeTelemetry,
    QueuedExecutor,
    two_stage_telemetry,
)

NUM_MICRO_BATCHES = 3
ALLOWANCE = 40  # two_stage_telemetry(): 0.04 s round trip / 1 ms per token
BLOCK_SIZE = 4
TOKEN_BUDGET = 64


def make_engine(
    telemetry: FakeTelemetry | None, enabled: bool = True, num_micro_batches: int = 3
) -> tuple[LLMEngine, QueuedExecutor, FakeClock]:
    sched = make_scheduler(
        num_blocks=512,
        block_size=BLOCK_SIZE,
        max_num_batched_tokens=TOKEN_BUDGET,
        max_num_seqs=32,
        max_model_len=1024,
    )
    executor = QueuedExecutor(FakeStage(sched))
    clock = FakeClock()
    transmission = TransmissionScheduler(TransmissionConfig(enabled=enabled), telemetry, clock)
    transmission.refresh()
    engine = LLMEngine(
        sched, executor, FakeTokenizer(), num_micro_batches, pacer=PipelinePacer(transmission)
    )
    return engine, executor, clock


def add(engine: LLMEngine, name: str, length: int, max_tokens: int, clock: FakeClock) -> None:
    prompt = [10 + (7 * i + len(name)) % 200 for i in range(length)]
    engine.add_request(name, prompt, SamplingParams(max_tokens=max_tokens), clock.now)


def run(engine: LLMEngine, max_steps: int = 2000) -> None:
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return
        engine.step()
    raise AssertionError("the engine did not finish")


def start_decoders(engine: LLMEngine, clock: FakeClock, num: int = 6) -> list[int]:
    for i in range(num):
        add(engine, f"d{i}", 3, 80, clock)
    while any(engine.scheduler.get_sequence(i).num_computed_tokens < 3 for i in range(num)):
        engine.step()
    return list(range(num))


def plans_with(plans: list[StepPlan], seq_id: int) -> list[int]:
    return [i for i, plan in enumerate(plans) if any(s.seq_id == seq_id for s in plan.scheduled)]


def test_decodes_keep_their_pace_while_a_long_prompt_streams_in_chunks():
    engine, executor, clock = make_engine(two_stage_telemetry())
    decoders = start_decoders(engine, clock)
    first = len(executor.submitted)
    add(engine, "long", 600, 4, clock)
    long_id = engine.scheduler.seq_ids_of("long")[0]
    while engine.scheduler.get_sequence(long_id).num_computed_tokens < 600:
        engine.step()
    plans = executor.submitted[first:]
    for seq_id in decoders:  # every decoder is in one of every K + 1 consecutive plans
        seen = plans_with(plans, seq_id)
        assert seen and seen[0] <= NUM_MICRO_BATCHES
        assert max(b - a for a, b in zip(seen, seen[1:], strict=False)) <= NUM_MICRO_BATCHES + 1
    assert all(prefill_tokens_of(plan) <= ALLOWANCE for plan in plans)
    in_flight_bound = ALLOWANCE + BLOCK_SIZE * (NUM_MICRO_BATCHES - 1)
    for end in range(len(plans)):
        window = plans[max(0, end - NUM_MICRO_BATCHES + 1) : end + 1]
        assert sum(prefill_tokens_of(plan) for plan in window) <= in_flight_bound
    run(engine)


def test_off_mode_sends_the_prefill_in_whole_token_budget_chunks():
    engine, executor, clock = make_engine(two_stage_telemetry(), enabled=False)
    start_decoders(engine, clock)
    first = len(executor.submitted)
    add(engine, "long", 600, 4, clock)
    engine.step()
    largest = max(prefill_tokens_of(plan) for plan in executor.submitted[first:])
    assert largest > ALLOWANCE
    assert largest + NUM_MICRO_BATCHES * 2 >= TOKEN_BUDGET  # only decodes share the plan
    run(engine)


def test_a_prefill_that_waits_gets_a_growing_share():
    engine, executor, clock = make_engine(two_stage_telemetry())
    start_decoders(engine, clock)
    add(engine, "long", 900, 4, clock)
    long_id = engine.scheduler.seq_ids_of("long")[0]
    for _ in range(6):
        engine.step()
    young = max(prefill_tokens_of(plan) for plan in executor.submitted[-3:])
    clock.now += 4.0  # two aging periods: three shares
    first = len(executor.submitted)
    for _ in range(6):
        engine.step()
    aged = max(prefill_tokens_of(plan) for plan in executor.submitted[first:])
    assert young <= ALLOWANCE < aged <= 3 * ALLOWANCE
    assert engine.scheduler.get_sequence(long_id) is not None
    run(engine)


def test_time_in_the_queue_does_not_lift_the_cap():
    engine, executor, clock = make_engine(two_stage_telemetry())
    start_decoders(engine, clock)
    prompt = [10 + i % 200 for i in range(900)]
    # Arrived 10 s ago (five aging periods), e.g. behind other prompts under overload.
    engine.add_request("queued", prompt, SamplingParams(max_tokens=4), clock.now - 10.0)
    first = len(executor.submitted)
    for _ in range(6):
        engine.step()
    assert 0 < max(prefill_tokens_of(plan) for plan in executor.submitted[first:]) <= ALLOWANCE
    run(engine)


def test_without_measurements_plans_are_those_of_the_plain_engine():
    def plans_of(engine: LLMEngine, executor: QueuedExecutor, clock: FakeClock):
        for i, length in enumerate((5, 90, 3, 200, 17)):
            add(engine, f"r{i}", length, 9, clock)
        run(engine)
        return [(p.micro_batch, p.scheduled, p.finished_seq_ids) for p in executor.submitted]

    unmeasured = two_stage_telemetry(bandwidth=float("inf"))
    for telemetry in (None, unmeasured):
        engine, executor, clock = make_engine(telemetry, num_micro_batches=1)
        plain, plain_executor, _ = make_engine(None, num_micro_batches=1)
        plain.pacer = None
        assert plans_of(engine, executor, clock) == plans_of(plain, plain_executor, clock)


def test_with_no_decode_to_protect_a_prompt_is_not_capped():
    engine, executor, clock = make_engine(two_stage_telemetry())
    add(engine, "alone", 600, 4, clock)
    engine.step()
    assert prefill_tokens_of(executor.submitted[0]) == TOKEN_BUDGET
    run(engine)
    assert engine.scheduler.num_decoding == 0
