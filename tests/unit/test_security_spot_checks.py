"""Spot checks: replicas of one span answer the same steps; a lying replica (one that
perturbs its hidden states slightly, one that returns wrong tokens) is singled out by two
honest witnesses within a few steps and banned, honest replicas never are, and rounding
within the dtypes' tolerance is not a disagreement."""

from __future__ import annotations

import dataclasses
import logging
import random

import pytest
import torch

from molink.config import LayerRange
from molink.errors import InvalidParameterError
from molink.pipeline.toy import ToyStageExecutor, expected_token, toy_identity
from molink.sampling_params import SamplingParams
from molink.security.bans import BanList, Verdicts
from molink.security.spot_check import (
    Answer,
    SpotChecker,
    compare_hidden,
    compare_sampled,
    tolerance_for,
)
from molink.step import NewSequenceData, SampledToken, ScheduledSequence, StepPlan, StepResult

MODEL = toy_identity(3)
GREEDY = SamplingParams(temperature=0.0)


class PerturbingExecutor(ToyStageExecutor):
    """A liar that nudges its output by 0.1% of its largest value."""

    def execute(self, plan, hidden, head_id=""):
        out = super().execute(plan, hidden, head_id)
        return out + 1e-3 * out.abs().max()


class WrongTokenExecutor(ToyStageExecutor):
    """A last stage that returns another token than the one it computed."""

    def execute(self, plan, hidden, head_id=""):
        result = super().execute(plan, hidden, head_id)
        sampled = tuple(dataclasses.replace(s, token_id=s.token_id + 1) for s in result.sampled)
        return dataclasses.replace(result, sampled=sampled)


def _steps(num_steps: int) -> list[StepPlan]:
    """One greedy sequence: its prompt, then one decode step per token."""
    prompt = (5, 6, 7)
    plans = [
        StepPlan(
            0,
            (ScheduledSequence(1, 0, len(prompt), (), True),),
            prompt,
            (NewSequenceData(1, prompt, len(prompt), GREEDY),),
        )
    ]
    token, done = expected_token(prompt[-1], 1, 3), len(prompt)
    for step in range(1, num_steps):
        plans.append(StepPlan(step, (ScheduledSequence(1, done, 1, (), True),), (token,)))
        token, done = expected_token(token, 1, 3), done + 1
    return plans


def _answer(node: str, out: torch.Tensor | StepResult) -> Answer:
    if isinstance(out, StepResult):
        return Answer(node, out)
    return Answer(node, StepResult(0), out)


def _run(replicas: dict[str, ToyStageExecutor], layers: LayerRange, num_steps: int):
    """Every step goes to a random replica and, with F = 1, again to a second one."""
    head = ToyStageExecutor(LayerRange(0, layers.start), MODEL)
    bans = BanList()
    checker = SpotChecker(1.0, Verdicts(bans), tolerance_for(torch.float32), random.Random(7))
    rng = random.Random(3)
    banned_after = {}
    for plan in _steps(num_steps):
        hidden = head.execute(plan, None, "h")
        allowed = sorted(n for n in replicas if bans.reason(n) is None)
        primary = rng.choice(allowed)
        assert checker.should_check()
        second = checker.second_replica(primary, list(replicas))
        if second is None:
            continue
        answers = [_answer(n, replicas[n].execute(plan, hidden, "h")) for n in (primary, second)]
        checker.judge_answers(answers[0], answers[1], frozenset({1}))
        for ban in bans.snapshot():
            banned_after.setdefault(ban.node_id, plan.step_id + 1)
    return bans, banned_after


@pytest.mark.parametrize(
    "layers,liar",
    [(LayerRange(1, 2), PerturbingExecutor), (LayerRange(2, 3), WrongTokenExecutor)],
    ids=["perturbed-hidden-states", "wrong-tokens"],
)
def test_a_liar_is_banned_within_a_few_steps_and_honest_replicas_never(
    layers: LayerRange, liar: type, caplog: pytest.LogCaptureFixture
) -> None:
    replicas = {
        "honest-a": ToyStageExecutor(layers, MODEL),
        "honest-b": ToyStageExecutor(layers, MODEL),
        "liar": liar(layers, MODEL),
    }
    with caplog.at_level(logging.WARNING):
        bans, banned_after = _run(replicas, layers, num_steps=30)
    assert list(banned_after) == ["liar"]
    assert banned_after["liar"] <= 8
    reason = bans.reason("liar")
    assert "disagreed with replicas honest-a and honest-b" in reason
    assert "banning node liar from routes" in caplog.text
    metrics = "\n".join(bans.metric_lines())
    assert "molink_banned_nodes 1" in metrics and 'molink_node_banned{node="liar"' in metrics
    assert 'molink_spot_checks_total{outcome="agreed"}' in metrics


def test_with_two_replicas_a_disagreement_bans_nobody(caplog) -> None:
    layers = LayerRange(1, 2)
    replicas = {
        "honest": ToyStageExecutor(layers, MODEL),
        "liar": PerturbingExecutor(layers, MODEL),
    }
    with caplog.at_level(logging.WARNING):
        bans, banned_after = _run(replicas, layers, num_steps=5)
    assert banned_after == {} and "nodes" in caplog.text and "disagree" in caplog.text
    assert 'molink_spot_checks_total{outcome="disagreed"} 5' in "\n".join(bans.metric_lines())


def test_malformed_answers_are_banned_at_once() -> None:
    bans = BanList()
    checker = SpotChecker(1.0, Verdicts(bans), tolerance_for(torch.float32))
    good = torch.ones(4, 8)
    bad = good.clone()
    bad[2, 3] = float("nan")
    assert "not finite" in checker.judge_answers(_answer("a", good), _answer("b", bad), frozenset())
    assert "malformed" in bans.reason("b") and bans.reason("a") is None


def test_rounding_within_the_dtypes_is_agreement_and_beyond_it_is_not() -> None:
    torch.manual_seed(0)
    x = torch.randn(16, 64) * 30
    half = tolerance_for(torch.float32, "float16")
    assert compare_hidden(x, x.half().float(), half) == ""
    assert "differ by up to" in compare_hidden(x, x.half().float(), tolerance_for(torch.float32))
    assert compare_hidden(x, x.to(torch.bfloat16).float(), tolerance_for("bfloat16")) == ""
    assert compare_hidden(x, x * 1.05, half) != ""
    assert "shape" in compare_hidden(x, x[:3], half)
    assert compare_hidden(x, (x * 127).round() / 127, tolerance_for("int8")) == ""
    deep = tolerance_for(torch.float32, layers=32)  # rounding grows with the layers
    assert deep.relative == 2 * tolerance_for(torch.float32, layers=16).relative
    assert tolerance_for(torch.float32, layers=1) == tolerance_for(torch.float32)


def test_tokens_are_compared_only_where_sampling_is_deterministic() -> None:
    tol = tolerance_for(torch.float32)
    mine = StepResult(0, (SampledToken(1, 10, -0.5), SampledToken(2, 20)))
    other = StepResult(0, (SampledToken(1, 10, -0.5), SampledToken(2, 21)))
    assert compare_sampled(mine, other, frozenset({1}), tol) == ""  # 2 samples at random
    assert "token 21, expected 20" in compare_sampled(mine, other, frozenset({1, 2}), tol)
    shifted = StepResult(0, (SampledToken(1, 10, -0.6), SampledToken(2, 20)))
    assert "logprob" in compare_sampled(mine, shifted, frozenset(), tol)


def test_the_fraction_is_checked() -> None:
    with pytest.raises(InvalidParameterError, match="molink_verify_fraction"):
        SpotChecker(1.5, Verdicts(BanList()), tolerance_for(torch.float32))
    checker = SpotChecker(0.1, Verdicts(BanList()), tolerance_for(torch.float32), random.Random(1))
    hits = sum(checker.should_check() for _ in range(10_000))
    assert 800 < hits < 1200
    assert not SpotChecker(0.0, Verdicts(BanList()), tolerance_for("float32")).should_check()
