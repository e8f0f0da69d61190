"""A token a node sends back must have a row in the model's embedding: the head feeds it
to its own stage in the sequence's next step, where an id without one fails the whole
step, and with it every other sequence of that batch (replayed, then failed after
MAX_REPLAYS). Such a token ends its own sequence with an error naming the id and the
range; the other sequences go on untouched."""

from __future__ import annotations

import dataclasses

import pytest

from molink.sampling_params import SamplingParams
from molink.step import SampledToken, TokenLogprob
from tests.unit.test_engine_state_ownership import _engine

VOCAB = 259  # FakeTokenizer's


def _params() -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, logprobs=1)


def _bad(token: SampledToken, how: str) -> SampledToken:
    if how == "id":
        return dataclasses.replace(token, token_id=VOCAB + 5)
    if how == "negative":
        return dataclasses.replace(token, token_id=-1)
    return dataclasses.replace(token, top_logprobs=(TokenLogprob(VOCAB, -0.1),))


@pytest.mark.parametrize("how", ["id", "negative", "alternative"])
def test_a_token_outside_the_vocabulary_ends_only_its_own_sequence(how: str) -> None:
    engine, executor = _engine(num_micro_batches=1)
    engine.add_request("a", [75, 76, 77], _params())
    engine.add_request("b", [78, 79], _params())
    engine.step()
    ((step_id, result),) = executor.held.items()
    bad = tuple(_bad(t, how) if t.seq_id == 0 else t for t in result.sampled)
    executor.held[step_id] = dataclasses.replace(result, sampled=bad)
    outputs = {}
    for _ in range(20):
        executor.deliver_all()
        for output in engine.step():
            outputs[output.request_id] = output
        if not engine.has_unfinished_requests():
            break
    (a,), (b,) = outputs["a"].outputs, outputs["b"].outputs
    assert a.finish_reason == "error" and a.token_ids == []
    assert f"[0, {VOCAB})" in a.error and "outside the vocabulary" in a.error
    assert b.finish_reason == "length" and len(b.token_ids) == 3
    assert engine.scheduler.num_replayed_sequences == 0
    assert not engine.has_unfinished_requests()
