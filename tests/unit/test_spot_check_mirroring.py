"""Mirroring checked sequences onto a check route: the mirrored plan keeps exactly the
checked sequences' rows under shadow ids, the check route swaps one hop for a replica of
its span, and the two results, paired in either order, convict a lying last stage."""

from __future__ import annotations

import dataclasses
import random

from molink.config import LayerRange
from molink.pipeline.identity import NodeInfo
from molink.pipeline.mirroring import (
    GROUP_STRIDE,
    SHADOW_OFFSET,
    PendingChecks,
    check_route,
    mirror_plan,
    unshadow,
)
from molink.pipeline.toy import ToyStageExecutor, toy_identity
from molink.placement.route import Route, RouteHop
from molink.sampling_params import SamplingParams
from molink.security.bans import BanList, Verdicts
from molink.security.spot_check import SpotChecker, tolerance_for
from molink.step import NewSequenceData, SampledToken, ScheduledSequence, StepPlan, StepResult

# A vocabulary that divides SHADOW_OFFSET: the toy's tokens depend on the sequence id.
MODEL = toy_identity(3, vocab_size=1024)
GREEDY = SamplingParams(temperature=0.0)


def _node(node_id: str, start: int, end: int) -> NodeInfo:
    return NodeInfo(node_id, MODEL, LayerRange(start, end), f"{node_id}:1", 10, 16)


def _route(*hops: tuple[str, int, int]) -> Route:
    return Route(tuple(RouteHop(n, f"{n}:1", s, e) for n, s, e in hops), "h:1")


def _checker(bans: BanList | None = None, seed: int = 0) -> SpotChecker:
    return SpotChecker(
        1.0, Verdicts(bans or BanList()), tolerance_for("float32"), random.Random(seed)
    )


def test_a_mirrored_plan_keeps_the_checked_sequences_rows_under_shadow_ids() -> None:
    plan = StepPlan(
        7,
        (
            ScheduledSequence(1, 4, 1, (3,), True),
            ScheduledSequence(2, 0, 3, (5, 6), True),
            ScheduledSequence(3, 9, 1, (), True),
        ),
        (11, 21, 22, 23, 31),
        (NewSequenceData(2, (21, 22, 23), 3, GREEDY),),
        finished_seq_ids=(2, 8),
        micro_batch=1,
    )
    mirrored, rows = mirror_plan(plan, frozenset({2, 3}))
    assert rows == [1, 2, 3, 4]
    assert mirrored.step_id == 7 + SHADOW_OFFSET and mirrored.micro_batch == 1
    second, _ = mirror_plan(plan, frozenset({2, 3}), group=1)
    assert second.scheduled[0].seq_id == 2 + SHADOW_OFFSET + GROUP_STRIDE  # apart on shared nodes
    assert unshadow(StepResult(second.step_id)).step_id == 7
    assert [s.seq_id - SHADOW_OFFSET for s in mirrored.scheduled] == [2, 3]
    assert all(s.new_block_ids == () for s in mirrored.scheduled)  # blocks are the head's
    assert mirrored.token_ids == (21, 22, 23, 31)
    assert [n.seq_id for n in mirrored.new_sequences] == [2 + SHADOW_OFFSET]
    assert mirrored.finished_seq_ids == (2 + SHADOW_OFFSET,)
    assert mirror_plan(plan, frozenset({99})) is None


def test_the_check_route_swaps_one_hop_for_an_unbanned_replica_of_its_span() -> None:
    primary = _route(("h", 0, 1), ("a", 1, 2), ("c", 2, 3))
    nodes = [_node("a", 1, 2), _node("b", 1, 2), _node("c", 2, 3), _node("x", 1, 3)]
    route, mine, other = check_route(primary, nodes, _checker())
    assert (mine, other) == ("a", "b")
    assert route.key == "h->b->c" and route.problem(3) is None
    again = check_route(primary, nodes + [_node("b2", 1, 2)], _checker(), frozenset({"b"}), "a")
    assert again[1:] == ("a", "b2")
    bans = BanList()
    bans.ban("b", "test")
    assert check_route(primary, nodes, _checker(bans)) is None


class WrongTokens(ToyStageExecutor):
    def execute(self, plan, hidden, head_id=""):
        result = super().execute(plan, hidden, head_id)
        return dataclasses.replace(
            result,
            sampled=tuple(dataclasses.replace(s, token_id=s.token_id + 1) for s in result.sampled),
        )


def test_three_answers_per_step_convict_a_liar_in_any_arrival_order() -> None:
    """Here the liar answers checks; a lying primary is outvoted in the pipeline test."""
    head = ToyStageExecutor(LayerRange(0, 1), MODEL)
    replicas = {
        "a": ToyStageExecutor(LayerRange(1, 3), MODEL),
        "b": ToyStageExecutor(LayerRange(1, 3), MODEL),
        "liar": WrongTokens(LayerRange(1, 3), MODEL),
    }
    nodes = [_node(n, 1, 3) for n in replicas]
    bans = BanList()
    pending = PendingChecks(_checker(bans, seed=5))
    token = 9
    for step in range(3):
        if step == 0:
            new = (NewSequenceData(4, (token,), 1, GREEDY),)
            plan = StepPlan(0, (ScheduledSequence(4, 0, 1, (), True),), (token,), new)
        else:
            plan = StepPlan(step, (ScheduledSequence(4, step, 1, (), True),), (token,))
        route = _route(("h", 0, 1), ("a", 1, 3))  # the liar only ever answers checks
        first = check_route(route, nodes, pending.checker)
        second = check_route(route, nodes, pending.checker, frozenset({first[2]}), "a")
        checks = {0: first[2], 1: second[2]}
        hidden = head.execute(plan, None, "h")
        pending.expect(plan, "a", checks, frozenset({4}))
        answers = [replicas["a"].execute(plan, hidden, "h")]
        for group, node in checks.items():
            mirrored, rows = mirror_plan(plan, frozenset({4}), group)
            answers.append(replicas[node].execute(mirrored, hidden[rows], "h"))
        order = answers if step % 2 else answers[::-1]
        assert pending.arrive(order[0]) == [] and pending.arrive(order[1]) == []
        (handed_on,) = pending.arrive(order[2])  # the primary's step, once all are in
        assert handed_on.step_id == step and handed_on.sampled == answers[0].sampled
        token = answers[0].sampled[0].token_id
        if bans.snapshot():
            break
    assert step == 0  # three answers to one step are enough
    assert [b.node_id for b in bans.snapshot()] == ["liar"]


def test_a_primary_waiting_for_a_check_node_that_left_is_handed_on() -> None:
    pending = PendingChecks(_checker())
    plan = StepPlan(3, (ScheduledSequence(4, 0, 1, (), True),), (9,))
    pending.expect(plan, "a", {0: "b", 1: "c"}, frozenset({4}))
    primary = StepResult(3, (SampledToken(4, 17),))
    assert pending.arrive(primary) == []
    assert pending.drop_node("c") == [primary]
    assert pending.arrive(StepResult(3 + SHADOW_OFFSET)) == []  # a late re-run is dropped
    assert pending.arrive(StepResult(4)) == [StepResult(4)]  # unchecked steps pass at once
