"""Micro-batching in the engine: exact outputs with K plans in flight and chunked prefill
transfers, and the head's sizer following the controller."""

from __future__ import annotations

from dataclasses import dataclass

from molink.cli.pipeline_builder import PipelineSizer
from molink.engine.llm_engine import LLMEngine
from molink.engine.microbatch_controller import MicroBatchController, MicroBatchPolicy
from molink.engine.offline import LLM
from molink.engine.pacing import PipelinePacer
from molink.engine.transmission import (
    TransmissionConfig,
    TransmissionScheduler,
    prefill_tokens_of,
)
from molink.sampling_params import SamplingParams
from tests.helpers.fake_engine import FakeTokenizer
from tests.unit.test_engine_fidelity import (
    GREEDY,
    _check_against_reference,
    _prompts,
    _reference,
)
from tests.unit.test_scheduler_helpers import FakeStage, make_scheduler
from tests.unit.test_transmission_fakes import (
    MB_PER_S,
    FakeClock,
    FakeTelemetry,
    QueuedExecutor,
    two_stage_telemetry,
)


def test_paced_micro_batches_keep_outputs_exact(tiny_model_dir) -> None:
    path = tiny_model_dir("llama")
    llm = LLM(
        model=str(path),
        dtype="float32",
        layer_splits=[1, 3],
        block_size=8,
        num_kv_blocks=64,
        max_num_batched_tokens=48,
    )
    # 0.04 s round trip at 1 ms per token on the slow hop: 40 prefill tokens in flight.
    telemetry = two_stage_telemetry(bandwidth=MB_PER_S, bytes_per_token=1000)
    transmission = TransmissionScheduler(TransmissionConfig(), telemetry, FakeClock())
    transmission.refresh()
    llm.engine.pacer = PipelinePacer(transmission)
    llm.engine.set_num_micro_batches(3)
    submitted = []
    submit = llm.engine.executor.submit
    llm.engine.executor.submit = lambda plan: (submitted.append(plan), submit(plan))

    prompts = _prompts(llm.engine.tokenizer.vocab_size)
    outputs = llm.generate(prompts, GREEDY)

    _check_against_reference(outputs, _reference(path, prompts))
    assert len({plan.micro_batch for plan in submitted}) >= 2
    with_decodes = [p for p in submitted if any(s.num_new_tokens == 1 for s in p.scheduled)]
    assert with_decodes and all(prefill_tokens_of(plan) <= 40 for plan in with_decodes)
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks


# -- the head's sizer ----------------------------------------------------------------------


@dataclass
class FakeView:
    epoch: int
    stages: tuple[str, ...]
    num_blocks: int

    def min_kv_blocks(self) -> int:
        return self.num_blocks


class FakeHead(FakeTelemetry):
    """A head executor that is ready and offers telemetry itself."""

    def __init__(self, telemetry: FakeTelemetry, num_stages: int, num_blocks: int) -> None:
        super().__init__(telemetry.links, telemetry.timings, telemetry.bytes_per_token)
        self.view = FakeView(1, tuple(f"s{i}" for i in range(num_stages)), num_blocks)

    def pipeline(self) -> FakeView:
        return self.view

    def readiness(self) -> str | None:
        return None

    def route_nodes(self) -> tuple[str, ...]:
        return self.view.stages


def sized_engine(telemetry: FakeTelemetry, pinned: int = 0):
    llm_engine = _tiny_engine()
    head = FakeHead(telemetry, 2, llm_engine.scheduler.kv.num_total_blocks)
    clock = FakeClock()
    transmission = TransmissionScheduler(TransmissionConfig(), head, clock)
    pacer = PipelinePacer(transmission)
    llm_engine.pacer = pacer
    policy = MicroBatchPolicy(patience=1, interval_s=0.0)
    controller = MicroBatchController(head, pinned=pinned, policy=policy, clock=clock)
    sizer = PipelineSizer(llm_engine, head, controller, pacer)
    return llm_engine, head, sizer


def _tiny_engine() -> LLMEngine:
    sched = make_scheduler()
    return LLMEngine(sched, QueuedExecutor(FakeStage(sched)), FakeTokenizer())


def test_sizer_starts_at_stages_plus_one_then_follows_the_measurements() -> None:
    telemetry = two_stage_telemetry(rtt_s=0.01, compute_s=(0.02, 0.02))
    engine, head, sizer = sized_engine(telemetry)
    assert sizer() == []
    assert engine.num_micro_batches == 3
    # (0.04 s of compute + 0.01 s of latency) / 1 ms per token on the slow hop
    assert engine.pacer.transmission.allowance == 50
    # (0.04 s of compute + 0.05 s of latency) / 0.02 s: 4.5 plans cover the bubble.
    head.links = two_stage_telemetry(rtt_s=0.05, bandwidth=float("inf")).links
    sizer()
    assert engine.num_micro_batches == 3  # nothing runs: nothing to learn from
    for i in range(6):
        engine.add_request(f"r{i}", [5 + i, 6, 7], SamplingParams(max_tokens=20))
    engine.step()
    sizer()
    assert engine.num_micro_batches == 5


def test_sizer_keeps_a_pinned_count() -> None:
    engine, head, sizer = sized_engine(two_stage_telemetry(rtt_s=0.2), pinned=2)
    sizer()
    sizer()
    assert engine.num_micro_batches == 2
