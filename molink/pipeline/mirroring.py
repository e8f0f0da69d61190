"""Re-running steps on a second replica: the check route, the mirrored plan, the pairing.

A stage keeps KV per (head, sequence), so a step can only be re-run where the sequence's
earlier steps ran too. A checked sequence is therefore mirrored from its first step on: the
head sends the part of every plan that concerns it, with the hidden states its own layers
computed, along a check route as well, under shadow ids (``SHADOW_OFFSET`` added to the
step and sequence ids) so that nodes both routes share keep the two apart. The check route
is the sequence's route with exactly one hop swapped for another replica of the same span,
so a disagreement names exactly two nodes (``molink.security.bans`` decides which lied).
Shadow ids change nothing a model computes: a sequence's sampling seed travels in its
sampling parameters.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, replace

from molink.pipeline.identity import NodeInfo
from molink.placement.route import Route, RouteHop
from molink.security.spot_check import SpotChecker
from molink.step import StepPlan, StepResult

SHADOW_OFFSET = 1 << 62  # far above any id a scheduler hands out; below uint64's limit
GROUP_STRIDE = 1 << 56  # check route g of a step uses ids + SHADOW_OFFSET + g * GROUP_STRIDE
MAX_CHECK_ROUTES = 2  # with the primary, three answers: a majority can name a liar
_MAX_PENDING = 10_000


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


@dataclass
class _Pending:
    primary_node: str
    check_nodes: dict[int, str]  # group -> the node its check route swapped in
    deterministic: frozenset[int]
    results: dict[int, StepResult]  # -1: the primary's; g: check route g's


class PendingChecks:
    """Gathers a step's result and its re-runs', in any order, and judges every pair."""

    def __init__(self, checker: SpotChecker) -> None:
        self.checker = checker
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, int], _Pending] = {}

    def expect(
        self,
        plan: StepPlan,
        primary_node: str,
        check_nodes: dict[int, str],
        deterministic: frozenset[int],
    ) -> None:
        with self._lock:
            while len(self._pending) >= _MAX_PENDING:  # steps whose re-run was lost
                self._pending.pop(next(iter(self._pending)))
            self._pending[(plan.step_id, plan.micro_batch)] = _Pending(
                primary_node, dict(check_nodes), deterministic, {}
            )

    def arrive(self, result: StepResult) -> list[StepResult]:
        """Takes any result the head receives; returns the primary results to hand on now:
        an unchecked one at once, a checked one once every re-run is in (the majority's
        tokens, when two re-runs agree against it), nothing for a shadow or while waiting."""
        group = -1
        if is_shadow(result.step_id):
            group = original_id(result.step_id)[1]
            result = unshadow(result)
        key = (result.step_id, result.micro_batch)
        with self._lock:
            pending = self._pending.get(key)
            if pending is None:
                return [] if group >= 0 else [result]
            pending.results[group] = result
            if len(pending.results) < len(pending.check_nodes) + 1:
                return []
            del self._pending[key]
        primary = pending.results[-1]
        if any(r.error for r in pending.results.values()):
            return [primary]  # a failed step proves nothing about anyone's honesty
        return [self._judge(pending)]

    def _judge(self, pending: _Pending) -> StepResult:
        primary = pending.results[-1]
        checks = [pending.results[g] for g in sorted(pending.check_nodes)]
        mirrored = {s.seq_id for r in checks for s in r.sampled}
        mine = replace(primary, sampled=tuple(s for s in primary.sampled if s.seq_id in mirrored))
        answers = [(pending.primary_node, mine)]
        answers += [
            (pending.check_nodes[g], pending.results[g]) for g in sorted(pending.check_nodes)
        ]
        verdicts = {}
        for i, first in enumerate(answers):
            for j in range(i + 1, len(answers)):
                verdicts[(i, j)] = self.checker.judge(first, answers[j], pending.deterministic)
        if len(answers) == 3 and verdicts[(0, 1)] and verdicts[(0, 2)] and not verdicts[(1, 2)]:
            return _with_tokens(primary, checks[0])  # two re-runs outvote the primary
        return primary

    def drop_node(self, node_id: str) -> list[StepResult]:
        """``node_id`` left: its re-runs will not come. Primary results held for them are
        handed on unverified; steps whose primary is still out are checked no more."""
        released = []
        with self._lock:
            for key, pending in list(self._pending.items()):
                if node_id in pending.check_nodes.values() or node_id == pending.primary_node:
                    del self._pending[key]
                    if -1 in pending.results:
                        released.append(pending.results[-1])
        return released

    def forget(self, step_id: int, micro_batch: int) -> None:
        with self._lock:
            self._pending.pop(
                (original_id(step_id)[0] if is_shadow(step_id) else step_id, micro_batch), None
            )


def _with_tokens(primary: StepResult, majority: StepResult) -> StepResult:
    """``primary`` with the majority's answer for every sequence the majority sampled."""
    theirs = {s.seq_id: s for s in majority.sampled}
    return replace(primary, sampled=tuple(theirs.get(s.seq_id, s) for s in primary.sampled))
