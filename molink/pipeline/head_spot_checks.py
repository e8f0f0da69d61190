"""The head's spot checks (``--molink-verify-fraction F``): which sequences it mirrors,
where, and what their results prove.

A sequence is chosen with probability F when it starts (or restarts) on a route; from then
on every step of it is also computed on that route's check routes (molink.pipeline.mirroring
says why whole sequences and not single steps: stages keep KV, and re-running one step
elsewhere would first need a prefill of the sequence's whole history there). F is thus the
expected fraction of the sequence-steps computed again. A check route swaps one hop for
another replica of its span; there are two where the span has three replicas, so that
every checked step gets three answers and a majority can name a liar (with two, a
disagreement is logged and counted, and nobody can be banned). All checked sequences of
one route share its check routes, which keeps one mirrored plan per check route and step.
Users' steps are never held for their re-runs, only the checked sequences' tokens
(molink.pipeline.spot_holds); the answers are judged apart (molink.pipeline.spot_judge:
hidden states as the next node received them, and tokens); a ban proven by the comparisons
(molink.security.bans) is handed to the head, which drops the node, replays its sequences
elsewhere and refuses it from then on, and the convicted node's held tokens are dropped.
A check route that fails (its node left, its KV is full) ends the mirroring of its
sequences and releases what it held; it never fails a user's step.
"""

from __future__ import annotations

import logging
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from molink.engine.recovery import TokenVerdict
from molink.pipeline.identity import NodeInfo
from molink.pipeline.mirroring import (
    MAX_CHECK_ROUTES,
    check_route,
    is_shadow,
    mirror_plan,
    shadow_id,
)
from molink.pipeline.spot_holds import HeldTokens
from molink.pipeline.spot_judge import CheckedStep, PendingChecks, SpotJudge
from molink.placement.route import Route
from molink.security.bans import BanList, Verdicts
from molink.security.spot_check import SpotChecker, tolerance_for
from molink.step import StepPlan, StepResult
from molink.transport.config import TransportConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MirrorPart:
    route: Route
    plan: StepPlan
    rows: list[int]


@dataclass(frozen=True)
class Mirror:
    """What the head sends besides a step: for each check route, its ``plan`` with the
    hidden-state ``rows`` of the checked sequences; and the sequences of the step itself
    whose input rows the node after the checked hop must keep (``witnessed``, declared
    on the plan: molink.pipeline.witness)."""

    parts: tuple[MirrorPart, ...]
    witnessed: tuple[int, ...] = ()

    def declare(self, plan: StepPlan) -> StepPlan:
        """``plan`` as the head sends it: declaring its checked sequences."""
        return replace(plan, witness_seq_ids=self.witnessed)


@dataclass(frozen=True)
class _CheckRoute:
    route: Route
    primary_node: str  # the hop the check route swaps, and its replica
    check_node: str


class HeadSpotChecks:
    def __init__(
        self,
        fraction: float,
        dtypes: Sequence[str],
        head_id: str,
        config: TransportConfig,
        on_verdict: Callable[[], None] = lambda: None,
        rng: random.Random | None = None,
    ) -> None:
        """``dtypes``: the head's own (compute, input, wire); every comparison also counts
        those of the two nodes compared."""
        self.bans = BanList()
        self._dtypes = tuple(dtypes)
        tolerance = tolerance_for(*_known_dtypes(self._dtypes))
        self.checker = SpotChecker(fraction, Verdicts(self.bans), tolerance, rng)
        # A held token waits at most for a re-run's step deadline and a witness question.
        self.holds = HeldTokens(config.step_timeout_s + config.rpc_timeout_s)
        self._judge = SpotJudge(self.checker, head_id, config, on_verdict, self._judged)
        self._pending = PendingChecks(self._judge.submit, self.holds)
        self._lock = threading.Lock()
        self._by_route: dict[str, list[_CheckRoute]] = {}  # primary route key -> check routes
        self._mirrored: dict[int, tuple[str, bool]] = {}  # seq -> (primary key, deterministic)
        self._shadow_routes: dict[tuple[int, int], Route] = {}

    def plan(self, plan: StepPlan, route: Route, nodes: Sequence[NodeInfo]) -> Mirror | None:
        """Choose new sequences to check, and the mirror of ``plan`` (None: none checked)."""
        with self._lock:
            for new in plan.new_sequences:
                self._mirrored.pop(new.seq_id, None)
                if self.checker.should_check() and self._check_routes(route, nodes):
                    deterministic = new.sampling.is_greedy or new.sampling.seed is not None
                    self._mirrored[new.seq_id] = (route.key, deterministic)
            named = [s.seq_id for s in plan.scheduled] + list(plan.finished_seq_ids)
            ids = frozenset(s for s in named if self._mirrored.get(s, ("", False))[0] == route.key)
            deterministic = frozenset(s for s in ids if self._mirrored[s][1])
            for seq_id in plan.finished_seq_ids:
                self._mirrored.pop(seq_id, None)
            checks = self._by_route.get(route.key, [])
            if any(self.bans.reason(c.check_node) for c in checks):
                checks = []  # a check node was banned: its sequences are checked no more
            parts = []
            for group, check in enumerate(checks):
                mirrored = mirror_plan(plan, ids, group)
                if mirrored is not None:
                    parts.append(MirrorPart(check.route, *mirrored))
                    key = (mirrored[0].step_id, plan.micro_batch)
                    self._shadow_routes[key] = check.route
        if not parts:
            return None
        if not any(p.plan.scheduled for p in parts):
            return Mirror(tuple(parts))
        step = self._checked_step(plan, route, checks, (ids, deterministic), nodes)
        self._pending.expect(step)
        if step.witness is None:  # the checked hop is the last: its tokens are compared
            return Mirror(tuple(parts))
        return Mirror(tuple(_witnessed(p) for p in parts), step.seq_ids)

    def _checked_step(
        self,
        plan: StepPlan,
        route: Route,
        checks: list[_CheckRoute],
        checked: tuple[frozenset[int], frozenset[int]],
        nodes: Sequence[NodeInfo],
    ) -> CheckedStep:
        """``checked``: the plan's checked sequences, and those sampled deterministically."""
        ids, deterministic = checked
        primary = checks[0].primary_node
        check_nodes = {g: c.check_node for g, c in enumerate(checks)}
        by_id = {n.node_id: n for n in nodes}
        compared = [by_id[n] for n in (primary, *check_nodes.values()) if n in by_id]
        dtypes = [*self._dtypes, *(d for n in compared for d in (n.dtype, n.wire_dtype))]
        return CheckedStep(
            step_id=plan.step_id,
            micro_batch=plan.micro_batch,
            primary_node=primary,
            check_nodes=check_nodes,
            deterministic=deterministic,
            seq_ids=tuple(s.seq_id for s in plan.scheduled if s.seq_id in ids and s.num_new_tokens),
            witness=route.next_after(primary),
            hidden_size=compared[0].model.hidden_size if compared else 0,
            tolerance=tolerance_for(*_known_dtypes(dtypes), layers=_span_layers(route, primary)),
        )

    def _check_routes(self, route: Route, nodes: Sequence[NodeInfo]) -> list[_CheckRoute]:
        current = self._by_route.get(route.key, [])
        if current and not any(self.bans.reason(c.check_node) for c in current):
            return current
        checks: list[_CheckRoute] = []
        for _ in range(MAX_CHECK_ROUTES):
            exclude = frozenset(c.check_node for c in checks)
            swap = checks[0].primary_node if checks else None
            found = check_route(route, nodes, self.checker, exclude, swap)
            if found is None:
                break
            checks.append(_CheckRoute(*found))
        self._by_route[route.key] = checks
        return checks

    def route_of(self, step_id: int, micro_batch: int) -> Route | None:
        with self._lock:
            return self._shadow_routes.get((step_id, micro_batch))

    def arrive(self, result: StepResult) -> list[StepResult]:
        """Every result the head receives passes here; returns the (primary) results to
        hand on now (molink.pipeline.spot_judge.PendingChecks.arrive)."""
        if is_shadow(result.step_id):
            with self._lock:
                route = self._shadow_routes.pop((result.step_id, result.micro_batch), None)
            if result.error and route is not None:
                self._end_mirrors(route, result.error)
        return self._pending.arrive(result)

    def _judged(self, step: CheckedStep) -> None:
        convicted = self.bans.reason(step.primary_node) is not None
        self.holds.judged((step.step_id, step.micro_batch), convicted)

    def take_verdicts(self) -> list[TokenVerdict]:
        """Whether each held token stands (molink.pipeline.spot_holds)."""
        return self.holds.take()

    def _end_mirrors(self, check: Route, error: str) -> None:
        with self._lock:
            keys = [k for k, cs in self._by_route.items() if any(c.route == check for c in cs)]
            for key in keys:
                del self._by_route[key]
            for seq_id, (key, _) in list(self._mirrored.items()):
                if key in keys:
                    del self._mirrored[seq_id]
        logger.warning("spot checks stop on check route %s: %s", check.key, error)

    def node_down(self, node_id: str) -> None:
        """``node_id`` left the routes: its check routes end, and the checked steps it
        was part of are judged no more (their primary results were handed on already)."""
        with self._lock:
            routes = [
                c.route for cs in self._by_route.values() for c in cs if c.route.contains(node_id)
            ]
        for route in routes:
            self._end_mirrors(route, f"node {node_id} left")
        self.holds.node_left(node_id, self._pending.drop_node(node_id))

    def close(self) -> None:
        self._judge.close()

    def release(self, seq_ids: Sequence[int]) -> list[tuple[Route, tuple[int, ...]]]:
        """The shadows to free, by check route, of sequences the head releases."""
        groups: dict[str, tuple[Route, list[int]]] = {}
        with self._lock:
            for seq_id in seq_ids:
                mirrored = self._mirrored.pop(seq_id, None)
                checks = self._by_route.get(mirrored[0], []) if mirrored else []
                for group, check in enumerate(checks):
                    groups.setdefault(check.route.key, (check.route, []))[1].append(
                        shadow_id(seq_id, group)
                    )
        return [(route, tuple(ids)) for route, ids in groups.values()]

    def metric_lines(self) -> list[str]:
        return [
            *self.bans.metric_lines(),
            *self._judge.metric_lines(),
            *self.holds.metric_lines(),
        ]


def _witnessed(part: MirrorPart) -> MirrorPart:
    """``part`` whose plan asks the nodes to keep every sequence's row: it schedules
    only checked sequences."""
    ids = tuple(s.seq_id for s in part.plan.scheduled if s.num_new_tokens)
    return replace(part, plan=replace(part.plan, witness_seq_ids=ids))


def _span_layers(route: Route, node_id: str) -> int:
    index = route.index_of(node_id)
    hop = route.hops[index] if index is not None else None
    return hop.end - hop.start if hop is not None else 1


def _known_dtypes(names: Sequence[str]) -> list[str]:
    """The floating-point dtypes among ``names`` (a node may say "auto")."""
    known = []
    for name in names:
        dtype = getattr(torch, name, None) if name != "int8" else torch.int8
        if isinstance(dtype, torch.dtype) and (dtype.is_floating_point or dtype == torch.int8):
            known.append(name)
    return known or ["float32"]
