"""Each piece of a sequence's state on the head has one owner: the scheduler's ``Sequence``
holds its tokens and the scheduler's ``InFlightPlans`` the plans in flight; the engine and
its request state read them and keep no copies (molink/engine/request_state.py)."""

from __future__ import annotations

import time

from molink.engine.llm_engine import LLMEngine
from molink.engine.recovery import NodeFailure, RecoveryStats
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams
from molink.step import FailureKind, StepPlan, StepResult
from tests.helpers.fake_engine import FakeTokenizer
from tests.unit.test_scheduler_helpers import FakeStage, make_scheduler


class HeldExecutor:
    """Runs each plan on a FakeStage when submitted, but hands its result back only when
    the test delivers it; it can also lose a step with its node (a RecoverySource)."""

    def __init__(self, stage: FakeStage) -> None:
        self.stage = stage
        self.submitted: list[StepPlan] = []
        self.held: dict[int, StepResult] = {}
        self.ready: list[StepResult] = []
        self.failures: list[NodeFailure] = []
        self.stats = RecoveryStats()

    def submit(self, plan: StepPlan) -> None:
        self.submitted.append(plan)
        self.held[plan.step_id] = self.stage.execute(plan)

    def deliver(self, step_id: int) -> StepResult:
        result = self.held.pop(step_id)
        self.ready.append(result)
        return result

    def deliver_all(self) -> None:
        for step_id in list(self.held):
            self.deliver(step_id)

    def lose(self, step_id: int) -> None:
        """The step's node died: the step fails, and its sequences' KV is gone."""
        self.held.pop(step_id)
        plan = next(p for p in self.submitted if p.step_id == step_id)
        seq_ids = tuple(s.seq_id for s in plan.scheduled)
        # The survivors forget them (the head's failover releases them there).
        for seq_id in seq_ids:
            self.stage.tables.pop(seq_id, None)
            self.stage.histories.pop(seq_id, None)
        self.ready.append(
            StepResult(
                step_id,
                micro_batch=plan.micro_batch,
                error="node x could not be reached",
                failure_kind=FailureKind.UNREACHABLE,
                failed_node_id="x",
            )
        )
        # Noticed now: every step submitted so far went before the loss.
        before = max(p.step_id for p in self.submitted) + 1
        self.failures.append(
            NodeFailure("x", FailureKind.UNREACHABLE, "gone", seq_ids, time.monotonic(), before)
        )

    def poll(self, timeout: float) -> list[StepResult]:
        ready, self.ready = self.ready, []
        return ready

    def release(self, seq_ids: list[int]) -> None:
        known = tuple(s for s in seq_ids if s in self.stage.tables)
        self.stage.execute(StepPlan(-1, (), (), finished_seq_ids=known))

    def readiness(self) -> str | None:
        return None

    def close(self) -> None:
        self.held.clear()

    def take_failures(self) -> list[NodeFailure]:
        failures, self.failures = self.failures, []
        return failures

    def recovery_stats(self) -> RecoveryStats:
        return self.stats


def _engine(num_micro_batches: int = 2, num_blocks: int = 64) -> tuple[LLMEngine, HeldExecutor]:
    scheduler = make_scheduler(num_blocks=num_blocks)
    executor = HeldExecutor(FakeStage(scheduler))
    engine = LLMEngine(scheduler, executor, FakeTokenizer(), num_micro_batches, recovery=executor)
    return engine, executor


def _params(max_tokens: int = 6) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _streamed(outputs: list[RequestOutput], into: dict[str, list[int]]) -> None:
    """What a streaming client receives: the delta token ids of each output."""
    for output in outputs:
        into.setdefault(output.request_id, []).extend(output.outputs[0].delta_token_ids)


def _run(engine: LLMEngine, executor: HeldExecutor, streamed: dict[str, list[int]]) -> None:
    for _ in range(200):
        _streamed(engine.step(), streamed)
        if not engine.has_unfinished_requests():
            return
        executor.deliver_all()
    raise AssertionError("the engine did not finish")


# -- plans in flight ---------------------------------------------------------------------


def test_the_engine_reads_the_schedulers_registry_of_plans_in_flight() -> None:
    engine, executor = _engine(num_micro_batches=2)
    in_flight = engine.scheduler.in_flight
    engine.add_request("a", [5, 6, 7], _params())
    engine.step()
    engine.add_request("b", [8, 9], _params())
    engine.step()
    first, second = executor.submitted
    assert in_flight.plans() == [first, second]
    assert engine.num_in_flight == engine.scheduler.num_in_flight == 2
    assert in_flight.busy_micro_batches() == {0, 1} and in_flight.free_micro_batch(2) is None

    executor.deliver(first.step_id)
    engine.step()  # takes the result back: its slot is free
    assert in_flight.busy_micro_batches() == {second.micro_batch}
    engine.step()  # the slot takes the next step
    assert in_flight.plan(first.step_id) is None and in_flight.plan(second.step_id) is second
    third = executor.submitted[2]
    assert third.micro_batch == first.micro_batch
    assert in_flight.plans() == [second, third]


def test_a_step_that_came_back_is_forgotten_once_and_a_repeat_is_ignored() -> None:
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [5, 6, 7], _params())
    engine.step()
    (plan,) = executor.submitted
    result = executor.deliver(plan.step_id)
    (output,) = engine.step()
    assert len(output.outputs[0].token_ids) == 1
    executor.held.clear()  # the plan scheduled after it never comes back
    executor.ready.append(result)  # a duplicate of the first result
    assert engine.step() == []  # ignored: no token twice
    seq = engine.scheduler.get_sequence(0)
    assert seq is not None and seq.num_output_tokens == 1


def test_fail_all_empties_the_registry_and_frees_every_slot() -> None:
    engine, executor = _engine(num_micro_batches=2)
    engine.add_request("a", [5, 6, 7], _params())
    engine.step()
    engine.add_request("b", [8, 9], _params())
    engine.step()
    late = list(executor.held)
    outputs = engine.fail_all("the pipeline is gone")
    assert {o.outputs[0].finish_reason for o in outputs} == {"error"}
    assert len(engine.scheduler.in_flight) == 0 and not engine.has_unfinished_requests()
    for step_id in late:  # late results of the forgotten plans
        executor.deliver(step_id)
    assert engine.step() == []
    engine.add_request("c", [4, 4], _params())
    engine.step()
    assert executor.submitted[-1].micro_batch == 1  # every slot was free again


def test_fewer_micro_batches_leave_busy_slots_to_drain() -> None:
    engine, executor = _engine(num_micro_batches=2)
    engine.add_request("a", [5, 6, 7], _params())
    engine.step()
    (plan,) = executor.submitted
    assert plan.micro_batch == 1
    engine.set_num_micro_batches(1)
    engine.add_request("b", [8, 9], _params())
    engine.step()  # slot 0 is free: b goes there while a's plan is still out
    assert [p.micro_batch for p in executor.submitted] == [1, 0]
    engine.step()
    assert len(executor.submitted) == 2  # slot 1 is beyond K now, slot 0 is busy


# -- tokens ------------------------------------------------------------------------------


def test_outputs_read_the_tokens_of_the_schedulers_sequences() -> None:
    engine, executor = _engine()
    engine.add_request("a", [5, 6, 7], SamplingParams(temperature=0.0, n=2, max_tokens=4))
    state = engine._requests["a"]
    seqs = [engine.scheduler.get_sequence(i) for i in state.seq_ids]
    assert state.sequences == seqs  # the very records, not copies
    assert state.prompt_token_ids is seqs[0].request.prompt_token_ids == (5, 6, 7)
    streamed: dict[str, list[int]] = {}
    finals = {}
    for _ in range(100):
        for output in engine.step():
            for choice in output.outputs:
                key = f"{output.request_id}/{choice.index}"
                streamed.setdefault(key, []).extend(choice.delta_token_ids)
                assert choice.token_ids == seqs[choice.index].output_token_ids
            if output.finished:
                finals = {c.index: c.token_ids for c in output.outputs}
        if not engine.has_unfinished_requests():
            break
        executor.deliver_all()
    assert finals[0] == streamed["a/0"] and finals[1] == streamed["a/1"]
    assert all(len(tokens) == 4 for tokens in finals.values())
    assert engine.scheduler.get_sequence(seqs[0].seq_id) is None  # released, forgotten


def test_a_replay_sends_exactly_the_tokens_the_client_streamed() -> None:
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [5, 6, 7, 8], _params(max_tokens=8))
    streamed: dict[str, list[int]] = {}
    while len(streamed.get("a", [])) < 3:  # prompt, then two decodes
        _streamed(engine.step(), streamed)
        executor.deliver_all()
    _streamed(engine.step(), streamed)  # the fourth token's step goes out
    assert len(streamed["a"]) == 3
    (in_flight,) = executor.held
    executor.lose(in_flight)
    sent = len(executor.submitted)
    for _ in range(5):  # the failure is taken, the sequence released, then sent again
        _streamed(engine.step(), streamed)
        if len(executor.submitted) > sent:
            break
    (resent,) = executor.submitted[-1].new_sequences
    assert resent.token_ids == (5, 6, 7, 8, *streamed["a"])
    assert resent.num_prompt_tokens == 4
    _run(engine, executor, streamed)
    assert len(streamed["a"]) == 8

    reference_engine, reference_executor = _engine(num_micro_batches=1)
    reference_engine.add_request("a", [5, 6, 7, 8], _params(max_tokens=8))
    reference: dict[str, list[int]] = {}
    _run(reference_engine, reference_executor, reference)
    assert streamed == reference


def test_preemption_keeps_the_tokens_and_resends_them() -> None:
    # Four blocks of 4 tokens: b's third block preempts the newer sequence c.
    engine, executor = _engine(num_micro_batches=1, num_blocks=4)
    streamed: dict[str, list[int]] = {}
    for name, prompt in (("b", [5, 6, 7]), ("c", [8, 9, 10])):
        engine.add_request(name, prompt, _params(max_tokens=8))
    _run(engine, executor, streamed)
    assert engine.scheduler.num_preemptions > 0
    resent = {}
    for plan in executor.submitted:
        for new in plan.new_sequences:
            resent[new.seq_id] = new.token_ids
    assert resent[1][:3] == (8, 9, 10) and len(resent[1]) > 3  # sent again with its outputs
    assert resent[1][3:] == tuple(streamed["c"][: len(resent[1]) - 3])
    kv = engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks


def test_abort_frees_the_single_record_once_its_plan_is_back() -> None:
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [5, 6, 7], _params())
    engine.step()
    output = engine.abort_request("a")
    assert output is not None and output.outputs[0].finish_reason == "abort"
    seq = engine.scheduler.get_sequence(0)
    assert seq is not None and seq.is_in_flight  # its plan still holds it
    executor.deliver_all()
    assert engine.step() == []
    assert engine.scheduler.get_sequence(0) is None and len(engine.scheduler.in_flight) == 0
    kv = engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks and not engine.has_unfinished_requests()


def test_a_request_the_engine_cannot_take_leaves_nothing_in_the_scheduler() -> None:
    engine, _ = _engine()

    class BrokenTokenizer(FakeTokenizer):
        def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
            raise RuntimeError("cannot decode")

    engine.tokenizer = BrokenTokenizer()
    try:
        engine.add_request("a", [5, 6, 7], _params())
    except RuntimeError:
        pass
    else:
        raise AssertionError("add_request should have failed")
    assert not engine.scheduler.has_unfinished() and engine.scheduler.request_tokens("a") == []
