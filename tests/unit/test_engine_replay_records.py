"""The engine's per-sequence replay records (when the failure that moved a sequence was
noticed) last only while the sequence is live: a long-running head must not keep one for
every sequence a lost node ever named."""

from __future__ import annotations

import dataclasses
import time

from molink.engine.llm_engine import LLMEngine
from molink.engine.recovery import NodeFailure, TokenVerdict
from molink.sampling_params import SamplingParams
from molink.step import FailureKind
from tests.helpers.fake_engine import FakeTokenizer
from tests.unit.test_engine_state_ownership import HeldExecutor, _engine
from tests.unit.test_scheduler_helpers import FakeStage, make_scheduler


def _params(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _lost(seq_ids: tuple[int, ...]) -> NodeFailure:
    return NodeFailure("x", FailureKind.UNREACHABLE, "gone", seq_ids, time.monotonic())


def test_a_failure_naming_a_finished_sequence_leaves_no_record() -> None:
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [5, 6, 7], _params(max_tokens=1))
    engine.step()
    executor.deliver_all()
    (output,) = engine.step()
    assert output.finished and not engine.has_unfinished_requests()
    # The node is noticed lost after the sequence finished (its release had not reached it).
    executor.failures.append(_lost((0,)))
    engine.step()
    assert engine._replayed_at == {}


def test_a_failure_naming_an_aborted_sequence_in_flight_leaves_no_record() -> None:
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [5, 6, 7], _params(max_tokens=4))
    engine.step()
    engine.abort_request("a")
    executor.lose(executor.submitted[-1].step_id)  # its plan and its node are lost
    for _ in range(5):
        engine.step()
    assert not engine.has_unfinished_requests()
    assert engine._replayed_at == {}


def test_a_token_from_before_the_replay_does_not_end_the_recovery() -> None:
    """A node is lost while a plan is out and the plan still comes back with a token: that
    token was computed before the failure, so the recovery is timed to the first token
    after the replay, once per replayed sequence."""
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [5, 6, 7], _params(max_tokens=4))
    engine.step()
    executor.deliver_all()
    engine.step()  # the first token
    engine.step()  # the next plan is out
    assert len(executor.held) == 1
    executor.failures.append(_lost((0,)))  # its node is lost while it is out
    engine.step()
    executor.deliver_all()  # ... and it still comes back with a token
    (output,) = engine.step()
    assert len(output.outputs[0].token_ids) == 2
    assert 0 in engine._replayed_at  # the replay has produced nothing yet
    for _ in range(20):
        executor.deliver_all()
        engine.step()
        if not engine.has_unfinished_requests():
            break
    stats = executor.stats
    assert stats.replayed_sequences == 1
    lines = "\n".join(stats.metric_lines())
    assert "molink:failover_recovery_seconds_count 1" in lines
    assert engine._replayed_at == {}


def test_a_sequence_that_ends_before_its_replay_is_no_recovery() -> None:
    """A node is lost while a plan is out, and the plan still brings the token that ends
    the sequence: it never replays, so no recovery is observed."""
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [5, 6, 7], _params(max_tokens=2))
    engine.step()
    executor.deliver_all()
    engine.step()  # the first token
    engine.step()  # the plan of the last one is out
    executor.failures.append(_lost((0,)))
    engine.step()
    executor.deliver_all()
    (output,) = engine.step()
    assert output.finished and len(output.outputs[0].token_ids) == 2
    stats = executor.stats
    assert stats.replayed_sequences == 0
    assert "molink:failover_recovery_seconds_count 0" in "\n".join(stats.metric_lines())
    assert engine._replayed_at == {}


class VerdictExecutor(HeldExecutor):
    """Also a VerdictSource: the test hands out verdicts on held tokens."""

    def __init__(self, stage: FakeStage) -> None:
        super().__init__(stage)
        self.verdicts: list[TokenVerdict] = []

    def take_verdicts(self) -> list[TokenVerdict]:
        verdicts, self.verdicts = self.verdicts, []
        return verdicts


def test_failing_everything_forgets_the_replays_not_yet_counted() -> None:
    """A refused token replays its sequence in a step that then has nothing in flight; the
    pipeline fails before the next step: the failed sequence leaves no record behind."""
    scheduler = make_scheduler()
    executor = VerdictExecutor(FakeStage(scheduler))
    engine = LLMEngine(scheduler, executor, FakeTokenizer(), 1, recovery=executor)
    engine.add_request("a", [5, 6, 7], _params(max_tokens=4))
    engine.step()
    (plan,) = executor.submitted
    held = executor.held[plan.step_id]
    executor.held[plan.step_id] = dataclasses.replace(held, held_seq_ids=(0,))
    executor.deliver_all()
    assert engine.step() == [] and scheduler.num_unverified == 1
    executor.verdicts.append(TokenVerdict(0, plan.step_id, keep=False))
    engine.step()  # replays it; nothing is in flight after
    assert scheduler.num_replayed_sequences == 1 and engine.num_in_flight == 0
    (failed,) = engine.fail_all("the pipeline is gone")
    assert failed.outputs[0].finish_reason == "error"
    engine.step()
    assert engine._replayed_at == {}


def test_a_second_failure_naming_an_aborted_sequence_in_flight_leaves_no_record() -> None:
    """Two nodes of a plan's route are lost while it is out, and its request is aborted
    between the two reports."""
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [5, 6, 7], _params(max_tokens=4))
    engine.step()
    executor.failures.append(_lost((0,)))
    engine.step()
    engine.abort_request("a")
    executor.failures.append(_lost((0,)))
    engine.step()
    executor.lose(executor.submitted[-1].step_id)
    for _ in range(5):
        engine.step()
    assert not engine.has_unfinished_requests()
    assert engine._replayed_at == {} and engine._failed_at == {}
