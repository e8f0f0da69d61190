"""A step's result owes each sequence it sampled a token it can use. A token outside the
model's embedding would fail the sequence's next step at the head's own stage, and with
it every other sequence of that batch; a missing token leaves the sequence's state on
the route unknown. Either way the node failed that sequence: it replays on another route
(as after a failed step, and fails after MAX_REPLAYS with an error saying so), and the
other sequences go on untouched."""

from __future__ import annotations

import dataclasses

import pytest

from molink.sampling_params import SamplingParams
from molink.scheduler.outcomes import MAX_REPLAYS
from molink.step import SampledToken, StepPlan, TokenLogprob
from tests.unit.test_engine_state_ownership import HeldExecutor, _engine
from tests.unit.test_scheduler_helpers import default_token

VOCAB = 259  # FakeTokenizer's


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=1)


def _reference(prompt: list[int]) -> list[int]:
    history = list(prompt)
    for _ in range(3):
        history.append(default_token(0, history))
    return history[len(prompt) :]


def _bad(token: SampledToken, how: str) -> SampledToken:
    if how == "id":
        return dataclasses.replace(token, token_id=VOCAB + 5)
    if how == "negative":
        return dataclasses.replace(token, token_id=-1)
    return dataclasses.replace(token, top_logprobs=(TokenLogprob(VOCAB, -0.1),))


def _run(engine, executor: HeldExecutor) -> dict:
    outputs = {}
    for _ in range(60):
        executor.deliver_all()
        for output in engine.step():
            outputs[output.request_id] = output
        if not engine.has_unfinished_requests():
            break
    assert not engine.has_unfinished_requests()
    return outputs


@pytest.mark.parametrize("how", ["id", "negative", "alternative"])
def test_a_token_outside_the_vocabulary_replays_only_its_own_sequence(how: str) -> None:
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [75, 76, 77], _params())
    engine.add_request("b", [78, 79], _params())
    engine.step()
    ((step_id, result),) = executor.held.items()
    bad = tuple(_bad(t, how) if t.seq_id == 0 else t for t in result.sampled)
    executor.held[step_id] = dataclasses.replace(result, sampled=bad)
    outputs = _run(engine, executor)
    (a,), (b,) = outputs["a"].outputs, outputs["b"].outputs
    assert a.finish_reason == "length" and a.token_ids == _reference([75, 76, 77])
    assert len(a.logprobs) == 3
    assert b.finish_reason == "length" and b.token_ids == _reference([78, 79])
    assert engine.scheduler.num_replayed_sequences == 1


class _Omitting(HeldExecutor):
    """The last stage never sends sequence 0's token."""

    def submit(self, plan: StepPlan) -> None:
        super().submit(plan)
        result = self.held[plan.step_id]
        kept = tuple(t for t in result.sampled if t.seq_id != 0)
        self.held[plan.step_id] = dataclasses.replace(result, sampled=kept)


def test_a_sequence_no_route_sends_a_token_for_ends_with_an_error() -> None:
    engine, executor = _engine(num_micro_batches=1)
    omitting = _Omitting(executor.stage)
    engine.executor = engine.recovery = omitting
    engine.add_request("a", [75, 76, 77], _params())
    engine.add_request("b", [78, 79], _params())
    outputs = _run(engine, omitting)
    (a,), (b,) = outputs["a"].outputs, outputs["b"].outputs
    assert a.finish_reason == "error" and a.token_ids == []
    assert a.error == (
        f"the last stage sent no token for sequence 0 (after {MAX_REPLAYS} replays on other routes)"
    )
    assert b.finish_reason == "length" and b.token_ids == _reference([78, 79])
    assert engine.scheduler.num_replayed_sequences == MAX_REPLAYS
