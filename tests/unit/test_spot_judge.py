"""Judging checked steps apart from users' steps: every primary result is handed on as it
arrives, its checked sequences' tokens marked held until the verdict (a check that fails
releases them); once a step's three answers are in (any order) they are judged, hidden
rows first (a perturbation that changes no token is still a disagreement), then tokens;
and what the next node received is kept for the head to ask."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from molink.config import LayerRange
from molink.engine.recovery import TokenVerdict
from molink.pipeline.identity import NodeInfo
from molink.pipeline.mirroring import SHADOW_OFFSET, check_route, mirror_plan, shadow_id
from molink.pipeline.spot_holds import HeldTokens
from molink.pipeline.spot_judge import CheckedStep, PendingChecks, SpotJudge
from molink.pipeline.toy import ToyStageExecutor, toy_identity
from molink.pipeline.witness import InputWitness
from molink.placement.route import Route, RouteHop
from molink.sampling_params import SamplingParams
from molink.security.bans import BanList, Verdicts
from molink.security.spot_check import Answer, SpotChecker, tolerance_for
from molink.step import NewSequenceData, SampledToken, ScheduledSequence, StepPlan, StepResult
from molink.transport.config import TransportConfig

MODEL = toy_identity(3, vocab_size=1024)  # the vocabulary divides the shadow id offsets
GREEDY = SamplingParams(temperature=0.0)
TOLERANCE = tolerance_for("float32")


def _checker(bans: BanList, seed: int = 0) -> SpotChecker:
    return SpotChecker(1.0, Verdicts(bans), TOLERANCE, random.Random(seed))


def _step(step_id: int, checks: dict[int, str], primary: str = "a") -> CheckedStep:
    return CheckedStep(step_id, 0, primary, checks, frozenset({4}), (4,), None, 8, TOLERANCE)


def _pending(completed: list[CheckedStep]) -> tuple[PendingChecks, HeldTokens]:
    holds = HeldTokens(wait_s=60.0)
    return PendingChecks(lambda step: completed.append(step) is None, holds), holds


class WrongTokens(ToyStageExecutor):
    def execute(self, plan, hidden, head_id=""):
        result = super().execute(plan, hidden, head_id)
        return dataclasses.replace(
            result,
            sampled=tuple(dataclasses.replace(s, token_id=s.token_id + 1) for s in result.sampled),
        )


@pytest.fixture
def judge_for():
    judges: list[SpotJudge] = []

    def make(bans: BanList, seed: int = 0) -> SpotJudge:
        judges.append(SpotJudge(_checker(bans, seed), "h", TransportConfig()))
        return judges[-1]

    yield make
    for judge in judges:
        judge.close()


def test_three_answers_convict_a_liar_in_any_arrival_order_and_only_tokens_wait(
    judge_for,
) -> None:
    head = ToyStageExecutor(LayerRange(0, 1), MODEL)
    replicas = {
        "a": ToyStageExecutor(LayerRange(1, 3), MODEL),
        "b": ToyStageExecutor(LayerRange(1, 3), MODEL),
        "liar": WrongTokens(LayerRange(1, 3), MODEL),
    }
    nodes = [NodeInfo(n, MODEL, LayerRange(1, 3), f"{n}:1", 10, 16) for n in replicas]
    bans = BanList()
    judge = judge_for(bans, seed=5)
    completed: list[CheckedStep] = []
    pending, holds = _pending(completed)
    route = Route((RouteHop("h", "h:1", 0, 1), RouteHop("a", "a:1", 1, 3)), "h:1")
    first = check_route(route, nodes, judge.checker)
    second = check_route(route, nodes, judge.checker, frozenset({first[2]}), "a")
    checks = {0: first[2], 1: second[2]}
    for order in (0, 1, 2):
        token = 9
        new = (NewSequenceData(4, (token,), 1, GREEDY),)
        plan = StepPlan(order, (ScheduledSequence(4, 0, 1, (), True),), (token,), new)
        hidden = head.execute(plan, None, "h")
        pending.expect(_step(order, checks))
        answers = [replicas["a"].execute(plan, hidden, "h")]
        for group, node in checks.items():
            mirrored, rows = mirror_plan(plan, frozenset({4}), group)
            answers.append(replicas[node].execute(mirrored, hidden[rows], "h"))
        arrival = answers[order:] + answers[:order]
        handed = [r for a in arrival for r in pending.arrive(a)]
        # The primary's result, as soon as it came, its checked token held for the verdict.
        assert handed == [dataclasses.replace(answers[0], held_seq_ids=(4,))]
        assert len(holds) == 1
        (step,) = completed
        judge.judge(completed.pop())
        assert step.results[-1] == answers[0]
        holds.judged((order, 0), primary_convicted=False)
        assert holds.take() == [TokenVerdict(4, order, keep=True)] and len(holds) == 0
    assert [b.node_id for b in bans.snapshot()] == ["liar"]


def test_a_check_node_that_left_drops_the_step_and_late_reruns_are_ignored() -> None:
    completed: list[CheckedStep] = []
    pending, holds = _pending(completed)
    pending.expect(_step(3, {0: "b", 1: "c"}))
    primary = StepResult(3, (SampledToken(4, 17), SampledToken(5, 18)))  # 5 is unchecked
    assert pending.arrive(primary) == [dataclasses.replace(primary, held_seq_ids=(4,))]
    holds.node_left("c", pending.drop_node("c"))
    assert holds.take() == [TokenVerdict(4, 3, keep=True)]  # released, unverified
    assert pending.arrive(StepResult(3 + SHADOW_OFFSET)) == []
    assert pending.arrive(StepResult(4)) == [StepResult(4)]  # unchecked steps pass too
    assert completed == []
    pending.expect(_step(6, {0: "b"}, primary="a"))
    pending.arrive(StepResult(6, (SampledToken(4, 17),)))
    holds.node_left("a", pending.drop_node("a"))  # the primary left: its token is dropped
    assert holds.take() == [TokenVerdict(4, 6, keep=False)]


def test_a_failed_step_is_not_judged() -> None:
    completed: list[CheckedStep] = []
    pending, holds = _pending(completed)
    pending.expect(_step(3, {0: "b"}))
    pending.arrive(StepResult(3, (SampledToken(4, 17),)))
    pending.arrive(StepResult(shadow_id(3, 0), error="kv full"))
    assert completed == []
    assert holds.take() == [TokenVerdict(4, 3, keep=True)]  # not held for a verdict to come


def test_a_hold_without_a_verdict_is_released_after_its_wait() -> None:
    now = [0.0]
    holds = HeldTokens(wait_s=5.0, clock=lambda: now[0])
    holds.hold((1, 0), (7, 8), "a")
    assert holds.take() == []
    now[0] = 5.0
    assert holds.take() == [TokenVerdict(7, 1, True), TokenVerdict(8, 1, True)]
    holds.judged((1, 0), primary_convicted=True)  # a late verdict changes nothing
    assert holds.take() == []
    assert 'molink_spot_check_held_tokens_total{outcome="released_unchecked"} 2' in "\n".join(
        holds.metric_lines()
    )


def test_hidden_rows_that_differ_beyond_rounding_disagree_though_tokens_agree() -> None:
    bans = BanList()
    checker = _checker(bans)
    tokens = StepResult(1, (SampledToken(4, 17),))
    rows = torch.full((1, 8), 3.0)
    honest = [Answer(n, tokens, rows * (1 + 2e-7)) for n in ("b", "c")]
    liar = Answer("a", tokens, rows + 1e-3)
    assert checker.judge_answers(liar, honest[0], frozenset({4})).startswith("hidden states")
    assert checker.judge_answers(liar, honest[1], frozenset({4}))
    assert checker.judge_answers(honest[0], honest[1], frozenset({4})) == ""
    assert [b.node_id for b in bans.snapshot()] == ["a"]
    assert bans.counts() == (1, 2)
    checker.judge_answers(Answer("d", tokens, rows * float("nan")), honest[0], frozenset())
    assert "malformed" in bans.reason("d")


def _plan(step_id: int, lengths: dict[int, int]) -> StepPlan:
    """A plan whose every sequence is declared checked."""
    scheduled = tuple(ScheduledSequence(s, 0, n, (), True) for s, n in lengths.items())
    return StepPlan(step_id, scheduled, (1,) * sum(lengths.values()), witness_seq_ids=(*lengths,))


def test_the_witness_keeps_each_sequences_last_received_row() -> None:
    witness = InputWitness()
    hidden = torch.arange(5 * 2, dtype=torch.float16).reshape(5, 2)
    witness.record("h", _plan(7, {4: 3, 9: 2}), hidden)
    rows = witness.rows("h", 7, 0, [9, 4])
    assert rows.dtype == torch.float32 and rows.tolist() == [[8.0, 9.0], [4.0, 5.0]]
    assert "no input of step 7" in witness.rows("other-head", 7, 0, [4])
    assert "no rows of [5]" in witness.rows("h", 7, 0, [5])


def test_the_witness_forgets_the_oldest_steps_beyond_its_budget() -> None:
    witness = InputWitness(max_bytes=3 * 2 * 4, max_steps=100)  # three rows of two floats
    for step in range(5):
        witness.record("h", _plan(step, {1: 1}), torch.ones(1, 2))
    assert isinstance(witness.rows("h", 1, 0, [1]), str)
    assert all(isinstance(witness.rows("h", s, 0, [1]), torch.Tensor) for s in (2, 3, 4))
    witness = InputWitness(max_steps=2)
    for step in range(3):
        witness.record("h", _plan(step, {1: 1}), torch.ones(1, 2))
    assert isinstance(witness.rows("h", 0, 0, [1]), str)
