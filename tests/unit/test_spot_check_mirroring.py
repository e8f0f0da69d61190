"""Mirroring checked sequences onto a check route: the mirrored plan keeps exactly the
checked sequences' rows under shadow ids, the check route swaps one hop for a replica of
its span (the judging: test_spot_judge.py)."""

from __future__ import annotations

import random

from molink.config import LayerRange
from molink.pipeline.identity import NodeInfo
from molink.pipeline.mirroring import (
    GROUP_STRIDE,
    SHADOW_OFFSET,
    check_route,
    mirror_plan,
    unshadow,
)
from molink.pipeline.toy import toy_identity
from molink.placement.route import Route, RouteHop
from molink.sampling_params import SamplingParams
from molink.security.bans import BanList, Verdicts
from molink.security.spot_check import SpotChecker, tolerance_for
from molink.step import NewSequenceData, ScheduledSequence, StepPlan, StepResult

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
