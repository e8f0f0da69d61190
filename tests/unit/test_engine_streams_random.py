"""What a client streaming from the head relies on while nodes die, in seeded random runs
of the engine: lost plans (reported at once or steps later), nodes lost while plans are
out or after they came back, plans refused for room, results missing a sequence's token,
aborts and preemption in a small KV cache, tokens held for a spot check's verdict (kept
or refused), with long prompts in chunks and n = 2.

Every stream gets each token once, in order, and the tokens are those of a run without
failures (the fake stage's token depends on the history only); its text is the text of
those tokens; a stream that ends early ends with a named error; and at the end no request,
record or block is left."""

from __future__ import annotations

import dataclasses
import random
import time

import pytest

from molink.engine.llm_engine import LLMEngine
from molink.engine.recovery import NodeFailure, TokenVerdict
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams
from molink.step import FailureKind, StepResult
from tests.helpers.fake_engine import FakeTokenizer
from tests.unit.test_engine_replay_random import SurvivorStage
from tests.unit.test_engine_replay_records import VerdictExecutor
from tests.unit.test_engine_state_ownership import HeldExecutor
from tests.unit.test_scheduler_helpers import default_token, make_scheduler


def _reference(prompt: list[int], max_tokens: int) -> list[int]:
    history = list(prompt)
    for _ in range(max_tokens):
        history.append(default_token(0, history))
    return history[len(prompt) :]


class _Streams:
    """What each client received: per (request, index) the tokens, the text, the end."""

    def __init__(self) -> None:
        self.tokens: dict[tuple[str, int], list[int]] = {}
        self.text: dict[tuple[str, int], str] = {}
        self.ends: dict[tuple[str, int], tuple[str, str | None]] = {}
        self.logprobs: dict[tuple[str, int], int] = {}

    def take(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            for out in output.outputs:
                key = (output.request_id, out.index)
                if key in self.ends:  # a sibling goes on: this one only repeats its end
                    assert not out.delta_token_ids and not out.delta_text, key
                    assert self.ends[key] == (out.finish_reason, out.error), key
                    continue
                self.tokens.setdefault(key, []).extend(out.delta_token_ids)
                self.text[key] = self.text.get(key, "") + out.delta_text
                assert self.tokens[key] == out.token_ids, f"{key}: deltas and tokens differ"
                self.logprobs[key] = len(out.logprobs or [])
                if out.finish_reason is not None:
                    self.ends[key] = (out.finish_reason, out.error)


def _refuse_for_room(executor: HeldExecutor, step_id: int) -> None:
    """A node had no room for the plan."""
    result = executor.held.pop(step_id)
    executor.ready.append(
        StepResult(
            step_id,
            micro_batch=result.micro_batch,
            error="node y has no room",
            failure_kind=FailureKind.KV_FULL,
            failed_node_id="y",
        )
    )


def _drop_a_token(executor: HeldExecutor, step_id: int) -> None:
    """The last stage's result lacks one sequence's token."""
    result = executor.held[step_id]
    if result.sampled:
        executor.held[step_id] = dataclasses.replace(result, sampled=result.sampled[1:])
    executor.deliver(step_id)


def _hold_tokens(executor: VerdictExecutor, step_id: int, awaiting: list) -> None:
    """The result's tokens wait for a spot check's verdict."""
    result = executor.held[step_id]
    held = tuple(token.seq_id for token in result.sampled)
    executor.held[step_id] = dataclasses.replace(result, held_seq_ids=held)
    executor.deliver(step_id)
    awaiting += [(seq_id, step_id) for seq_id in held]


def _give_verdicts(executor: VerdictExecutor, awaiting: list, rng: random.Random) -> None:
    for seq_id, step_id in awaiting:
        executor.verdicts.append(TokenVerdict(seq_id, step_id, keep=rng.random() < 0.7))
    awaiting.clear()


def _failure(executor: HeldExecutor, step_id: int, came_back: bool) -> None:
    plan = next(p for p in executor.submitted if p.step_id == step_id)
    if came_back:
        executor.deliver(step_id)
    before = max(p.step_id for p in executor.submitted) + 1
    seq_ids = tuple(s.seq_id for s in plan.scheduled)
    for seq_id in seq_ids:  # their KV went with the node
        executor.stage.tables.pop(seq_id, None)
        executor.stage.histories.pop(seq_id, None)
    executor.failures.append(
        NodeFailure("z", FailureKind.UNREACHABLE, "gone", seq_ids, time.monotonic(), before)
    )


def _act(
    engine: LLMEngine,
    executor: VerdictExecutor,
    rng: random.Random,
    later: list,
    awaiting: list,
) -> None:
    roll = rng.random()
    step_id = rng.choice(list(executor.held)) if executor.held else None
    if roll < 0.05 and engine._requests:
        engine.abort_request(rng.choice(list(engine._requests)))
    elif roll < 0.08 and awaiting:
        _give_verdicts(executor, awaiting, rng)
    elif step_id is None:
        return
    elif roll < 0.10:
        executor.lose(step_id)
    elif roll < 0.12:
        executor.lose(step_id)
        later.append([rng.randint(1, 4), executor.failures.pop()])
    elif roll < 0.15:
        _failure(executor, step_id, came_back=rng.random() < 0.5)
    elif roll < 0.18:
        _refuse_for_room(executor, step_id)
    elif roll < 0.20:
        _drop_a_token(executor, step_id)
    elif roll < 0.25:
        _hold_tokens(executor, step_id, awaiting)
    elif roll < 0.6:
        executor.deliver(step_id)


def _report_due(executor: HeldExecutor, later: list) -> None:
    for entry in later:
        entry[0] -= 1
        if entry[0] == 0:
            executor.failures.append(entry[1])
    later[:] = [entry for entry in later if entry[0] > 0]


@pytest.mark.parametrize("seed", range(40))
def test_every_stream_gets_each_token_once_and_ends_clearly(seed: int) -> None:
    rng = random.Random(seed)
    scheduler = make_scheduler(
        num_blocks=rng.choice([12, 24, 64]),
        max_num_batched_tokens=16,
        long_prefill_token_threshold=rng.choice([0, 4]),
    )
    executor = VerdictExecutor(SurvivorStage(scheduler))
    engine = LLMEngine(
        scheduler, executor, FakeTokenizer(), rng.choice([1, 2, 3]), recovery=executor
    )
    streams = _Streams()
    expected: dict[str, list[int]] = {}
    later: list = []  # [steps until reported, failure]
    awaiting: list[tuple[int, int]] = []  # (seq id, step id) of tokens held for a verdict
    for index in range(200):
        if rng.random() < 0.12:
            prompt = [rng.randint(70, 80) for _ in range(rng.randint(1, 20))]
            params = SamplingParams(
                n=rng.choice([1, 2]),
                temperature=0.0,
                max_tokens=rng.randint(2, 8),
                ignore_eos=True,
                logprobs=0,
            )
            engine.add_request(f"r{index}", prompt, params)
            expected[f"r{index}"] = _reference(prompt, params.max_tokens)
        _act(engine, executor, rng, later, awaiting)
        _report_due(executor, later)
        streams.take(engine.step())
        scheduler.check_integrity()
    for _ in range(1000):
        if not engine.has_unfinished_requests() and not later:
            break
        executor.deliver_all()
        _give_verdicts(executor, awaiting, rng)
        _report_due(executor, later)
        streams.take(engine.step())
    assert not engine.has_unfinished_requests()
    engine.step()  # the last releases
    tokenizer = FakeTokenizer()
    for (request_id, index), tokens in streams.tokens.items():
        reference = expected[request_id]
        reason, error = streams.ends.get((request_id, index), ("abort", None))
        assert tokens == reference[: len(tokens)], (request_id, index, tokens, reference)
        assert streams.text[(request_id, index)] == tokenizer.decode(tokens)
        assert streams.logprobs[(request_id, index)] == len(tokens)
        if reason == "length":
            assert tokens == reference
        elif reason == "error":
            assert error, (request_id, index)
        else:
            assert reason == "abort", (request_id, index, reason)
    assert engine._replayed_at == {} and engine._failed_at == {}
    assert scheduler.kv.num_free_blocks == scheduler.kv.num_total_blocks
    assert not scheduler.has_unfinished() and scheduler.num_in_flight == 0
