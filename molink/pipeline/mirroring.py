"""Re-running steps on a second replica: the check route, the mirrored plan, the pairing.

A stage keeps KV per (head, sequence), so a step can only be re-run where the sequence's
earlier steps ran too. A checked sequence is therefore mirrored from its first step on: the
head sends the part of every plan that concerns it, with the hidden states its own layers
computed, along a check route as well, under shadow ids (``SHADOW_OFFSET`` added to the
step and sequence ids) so that nodes both routes share keep the two apart. The check route
is the sequence's route with exactly one hop swapped for another replica of the same span,
so a disagreement names exactly two nodes (``molink.security.bans`` decides which lied);
the node after that hop is the same on both routes, and tells the head what each sent it
(molink.pipeline.witness, molink.pipeline.spot_judge).
Shadow ids change nothing a model computes: a sequence's sampling seed travels in its
sampling parameters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from molink.pipeline.identity import NodeInfo
from molink.placement.route import Route, RouteHop
from molink.security.spot_check import SpotChecker
from molink.step import StepPlan, StepResult

SHADOW_OFFSET = 1 << 62  # far above any id a scheduler hands out; below uint64's limit
GROUP_STRIDE = 1 << 56  # check route g of a step uses ids + SHADOW_OFFSET + g * GROUP_STRIDE
MAX_CHECK_ROUTES = 2  # with the primary, three answers: a majority can name a liar


def is_shadow(step_id: int) -> bool:
    return step_id >= SHADOW_OFFSET


def shadow_id(id_: int, group: int) -> int:
    return id_ + SHADOW_OFFSET + group * GROUP_STRIDE


def original_id(id_: int) -> tuple[int, int]:
    """(the primary's id, the check route's group) of a shadow id."""
    return id_ % GROUP_STRIDE, (id_ - SHADOW_OFFSET) // GROUP_STRIDE


def check_route(
    primary: Route,
    nodes: Sequence[NodeInfo],
    checker: SpotChecker,
    exclude: frozenset[str] = frozenset(),
    swap: str | None = None,
) -> tuple[Route, str, str] | None:
    """``primary`` with one remote hop (``swap``'s, if given) swapped for another replica
    of its span (none of ``exclude``), and the two nodes compared (primary's, check's);
    None when no hop has an unbanned replica."""
    swappable = []
    for index, hop in enumerate(primary.hops[1:], start=1):
        if swap is not None and hop.node_id != swap:
            continue
        replicas = [
            n.node_id
            for n in nodes
            if (n.layers.start, n.layers.end) == (hop.start, hop.end)
            and not primary.contains(n.node_id)
            and n.node_id not in exclude
        ]
        if replicas:
            swappable.append((index, hop, replicas))
    if not swappable:
        return None
    index, hop, replicas = swappable[checker.pick_index(len(swappable))]
    other = checker.second_replica(hop.node_id, replicas)
    if other is None:
        return None
    address = next(n.address for n in nodes if n.node_id == other)
    hops = list(primary.hops)
    hops[index] = RouteHop(other, address, hop.start, hop.end)
    return Route(tuple(hops), primary.head_address), hop.node_id, other


def mirror_plan(
    plan: StepPlan, seq_ids: frozenset[int], group: int = 0
) -> tuple[StepPlan, list[int]] | None:
    """The part of ``plan`` that concerns ``seq_ids``, under the shadow ids of check route
    ``group``, and the rows of the plan's flat tokens it keeps; None when the plan
    schedules none of them."""
    rows: list[int] = []
    scheduled = []
    start = 0
    for seq in plan.scheduled:
        if seq.seq_id in seq_ids:
            rows.extend(range(start, start + seq.num_new_tokens))
            scheduled.append(replace(seq, seq_id=shadow_id(seq.seq_id, group), new_block_ids=()))
        start += seq.num_new_tokens
    finished = tuple(shadow_id(s, group) for s in plan.finished_seq_ids if s in seq_ids)
    if not scheduled and not finished:
        return None
    mirrored = StepPlan(
        step_id=shadow_id(plan.step_id, group),
        scheduled=tuple(scheduled),
        token_ids=tuple(plan.token_ids[r] for r in rows),
        new_sequences=tuple(
            replace(n, seq_id=shadow_id(n.seq_id, group))
            for n in plan.new_sequences
            if n.seq_id in seq_ids
        ),
        finished_seq_ids=finished,
        micro_batch=plan.micro_batch,
    )
    return mirrored, rows


def unshadow(result: StepResult) -> StepResult:
    """A check route's result under the primary's ids."""
    return replace(
        result,
        step_id=original_id(result.step_id)[0],
        sampled=tuple(replace(s, seq_id=original_id(s.seq_id)[0]) for s in result.sampled),
    )
