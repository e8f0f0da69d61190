"""The head's routes: which route each sequence is on, and where new sequences go.

One owner for it (a sequence's KV lives on the nodes of its route, so it stays there until
it is released or preempted). It implements the engine's PlanRouter
(molink/engine/routing.py): the routes that hold sequences are offered in turn, and the
route the routing rule (molink/placement/router.py) picks for one more sequence takes new
ones. The rule is asked again for every new sequence, with the sequences this head keeps
on each node as load, so that replicas share the work by their measured speed.

The route for new sequences is worked out afresh by every ``choices`` (the start of a
step). Readers that only follow it (the head's telemetry and status: ``new_route``) get
that step's answer instead of working it out again, until a node is evicted, avoided or
found full, a cooldown runs out, or it is ``NEW_ROUTE_MAX_AGE_S`` old. Sequences bound,
sent or released during the step do not renew it: they move the load by one step's worth,
which the next ``choices`` counts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from molink.placement.route import Route
from molink.placement.router import Candidate, LinkLookup, best_route
from molink.step import StepPlan

FULL_COOLDOWN_S = 1.0  # a node that refused for lack of KV gets no new sequence this long
# How long a reader may be given the route for new sequences that ``choices`` worked out:
# the swarm's measurements (health, step timings) move on between steps, and an idle
# engine calls no ``choices``.
NEW_ROUTE_MAX_AGE_S = 0.25


@dataclass(frozen=True)
class SwarmSnapshot:
    """What the routing rule reads (built by molink.pipeline.swarm_view.SwarmView)."""

    head: Candidate
    nodes: tuple[Candidate, ...]
    num_layers: int
    head_address: str
    step_bytes: float
    links: LinkLookup
    block_size: int


@dataclass(frozen=True)
class _NewRoute:
    """The route for new sequences as worked out with the book at ``version``, good until
    ``valid_until`` (clock time)."""

    route: Route | None
    version: int
    valid_until: float


class BookChoice:
    """A RouteChoice (molink.engine.routing) for one route."""

    def __init__(self, book: RouteBook, route: Route, takes_new: bool) -> None:
        self.book = book
        self.route = route
        self.takes_new = takes_new
        self.admitted: dict[int, int] = {}  # seq id -> the tokens it may come to hold
        self.promised_blocks = 0  # KV blocks the sequences admitted into this plan need

    def accepts(self, seq_id: int, num_tokens: int) -> bool:
        current = self.book.route_of(seq_id)
        if current is not None:
            return current.key == self.route.key
        if not self.takes_new:
            return False
        best = self.book.route_for_new(
            num_tokens, extra=len(self.admitted), extra_blocks=self.promised_blocks, on=self.route
        )
        if best is None and not self.admitted and not self.book.load():
            # Nothing runs that could free room for all it may hold: start it anyway, its
            # growth is then bounded by the nodes' refusals.
            best = self.book.route_for_new(0)
        if best is None or best.key != self.route.key:
            return False
        self.admitted[seq_id] = num_tokens
        self.promised_blocks += self.book.blocks_for(num_tokens)
        return True


class RouteBook:
    """Thread-safe: the engine thread schedules, the head's threads report failures."""

    def __init__(
        self,
        snapshot: Callable[[], SwarmSnapshot],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._snapshot = snapshot
        self._clock = clock
        self._lock = threading.Lock()
        # Bumped when a node is evicted, avoided or found full: the route for new sequences
        # cached before it is not handed out again.
        self._version = 0
        self._new_route: _NewRoute | None = None
        self._seq_route: dict[int, Route] = {}
        self._seq_tokens: dict[int, int] = {}
        # Tokens a sequence was admitted for: its KV on the route's nodes may grow to this.
        self._seq_reserved: dict[int, int] = {}
        self._plan_route: dict[int, Route] = {}  # step id -> route, until submitted
        self._full_until: dict[str, float] = {}
        self._avoid_until: dict[str, float] = {}  # suspected nodes: no new sequences
        self._turn = 0
        self.route_choices: dict[str, int] = {}  # route key -> sequences sent that way

    # -- PlanRouter --------------------------------------------------------------------

    def choices(self) -> list[BookChoice]:
        """The routes a plan may take, in the order the engine tries them (it takes the
        first that yields a plan): every route with sequences, and the route the rule
        picks for new ones. Each goes first in turn, the new sequences' route too even
        while it holds none: a route whose running sequences always fill a plan would
        otherwise be tried first every time, and sequences waiting for another route
        would wait until those finished (32 prompts at once: 15 started on one replica,
        17 waited while they generated)."""
        with self._lock:
            routes = {r.key: r for r in self._seq_route.values()}
            self._turn += 1
            turn = self._turn
        new = self._fresh_new_route()
        ordered = sorted(routes.values(), key=lambda r: r.key)
        if new is not None and new.key not in routes:
            ordered.append(new)
        if ordered:
            shift = turn % len(ordered)
            ordered = ordered[shift:] + ordered[:shift]
        return [BookChoice(self, r, new is not None and r.key == new.key) for r in ordered]

    def bind(self, plan: StepPlan, choice: BookChoice) -> None:  # type: ignore[override]
        with self._lock:
            self._plan_route[plan.step_id] = choice.route
            for seq in plan.new_sequences:
                self._seq_route[seq.seq_id] = choice.route
                self._seq_reserved[seq.seq_id] = choice.admitted.get(seq.seq_id, 0)
                self.route_choices[choice.route.key] = (
                    self.route_choices.get(choice.route.key, 0) + 1
                )

    def route_choices_snapshot(self) -> dict[str, int]:
        """Sequences sent each way so far, by route key (for /metrics)."""
        with self._lock:
            return dict(self.route_choices)

    # -- the head executor's side ------------------------------------------------------

    def route_of(self, seq_id: int) -> Route | None:
        with self._lock:
            return self._seq_route.get(seq_id)

    def route_for_plan(self, plan: StepPlan) -> Route | None:
        """The route ``plan`` goes: the one it was bound to, or its sequences' own; plans
        not scheduled through choices (tests, tools) put new sequences on the best route."""
        with self._lock:
            bound = self._plan_route.pop(plan.step_id, None)
            known = {
                self._seq_route[s.seq_id].key: self._seq_route[s.seq_id]
                for s in plan.scheduled
                if s.seq_id in self._seq_route
            }
        if bound is None and len(known) > 1:
            return None
        route = bound or next(iter(known.values()), None) or self.route_for_new(plan.num_tokens)
        if route is None:
            return None
        with self._lock:
            for seq in plan.new_sequences:
                if seq.seq_id not in self._seq_route:
                    self._seq_route[seq.seq_id] = route
                    self.route_choices[route.key] = self.route_choices.get(route.key, 0) + 1
            for sched in plan.scheduled:
                self._seq_tokens[sched.seq_id] = sched.num_computed_tokens + sched.num_new_tokens
        return route

    def forget(self, seq_ids: list[int]) -> dict[str, tuple[Route, list[int]]]:
        """Sequences released (finished, aborted, preempted): grouped by the route whose
        nodes must free them."""
        groups: dict[str, tuple[Route, list[int]]] = {}
        with self._lock:
            for seq_id in seq_ids:
                route = self._seq_route.pop(seq_id, None)
                self._seq_tokens.pop(seq_id, None)
                self._seq_reserved.pop(seq_id, None)
                if route is not None:
                    groups.setdefault(route.key, (route, []))[1].append(seq_id)
        return groups

    def evict(self, node_id: str) -> dict[str, tuple[Route, list[int]]]:
        """A node is gone: forget every sequence whose route went through it (its KV there
        is lost; it will be replayed elsewhere), grouped by route, so that the head can
        free what they hold on the route's other nodes."""
        with self._lock:
            self._version += 1
            lost = [s for s, r in self._seq_route.items() if r.contains(node_id)]
            self._plan_route = {
                step: r for step, r in self._plan_route.items() if not r.contains(node_id)
            }
        return self.forget(lost)

    def avoid(self, node_id: str, seconds: float) -> None:
        """No new sequence goes through ``node_id`` for ``seconds`` (it failed a step and
        is being probed)."""
        with self._lock:
            self._version += 1
            until = self._clock() + seconds
            self._avoid_until[node_id] = max(until, self._avoid_until.get(node_id, 0.0))

    def mark_full(self, node_id: str) -> None:
        with self._lock:
            self._version += 1
            self._full_until[node_id] = self._clock() + FULL_COOLDOWN_S

    def load(self) -> dict[str, int]:
        """Sequences this head keeps on each node."""
        with self._lock:
            routes = list(self._seq_route.values())
        counts: dict[str, int] = {}
        for route in routes:
            for hop in route.hops:
                counts[hop.node_id] = counts.get(hop.node_id, 0) + 1
        return counts

    def blocks_for(self, num_tokens: int) -> int:
        block_size = self._snapshot().block_size
        return -(-num_tokens // block_size) if block_size else 0

    def route_for_new(
        self,
        num_tokens: int,
        extra: int = 0,
        extra_blocks: int = 0,
        on: Route | None = None,
    ) -> Route | None:
        """The routing rule's choice for one more sequence of ``num_tokens`` tokens, with
        ``extra`` sequences (holding ``extra_blocks``) already promised to ``on``."""
        snap = self._snapshot()
        load, used = self._usage(snap.block_size)
        if on is not None:
            for hop in on.hops:
                load[hop.node_id] = load.get(hop.node_id, 0) + extra
                used[hop.node_id] = used.get(hop.node_id, 0) + extra_blocks
        now = self._clock()
        with self._lock:
            # Cooldowns that ran out are dropped, not only skipped: a swarm's churn mints
            # node ids, and each one ever marked would stay.
            self._full_until = {n: u for n, u in self._full_until.items() if u > now}
            self._avoid_until = {n: u for n, u in self._avoid_until.items() if u > now}
            full, avoided = set(self._full_until), set(self._avoid_until)
        nodes = [_with_usage(n, load, used, full) for n in snap.nodes if n.node_id not in avoided]
        head = _with_usage(snap.head, load, used, set())
        needed = -(-num_tokens // snap.block_size) if snap.block_size else 0
        found = best_route(
            head,
            nodes,
            snap.num_layers,
            snap.head_address,
            step_bytes=snap.step_bytes,
            links=snap.links,
            blocks_needed=needed,
        )
        return found[0] if found else None

    def new_route(self) -> Route | None:
        """The route a new sequence takes, for readers that follow the route new sequences take: the
        answer ``choices`` worked out this step while it still holds (see the module
        docstring), else worked out again."""
        with self._lock:
            cached = self._new_route
            if (
                cached is not None
                and cached.version == self._version
                and self._clock() < cached.valid_until
            ):
                return cached.route
        return self._fresh_new_route()

    def _fresh_new_route(self) -> Route | None:
        """The route for new sequences worked out now, and kept for ``new_route``."""
        now = self._clock()
        with self._lock:
            version = self._version  # a change while it is worked out makes it stale at once
        # A new sequence needs at least one block: a full node is offered only when no
        # route has room (else every choice would refuse new sequences until its cooldown
        # ran out, while a replica with room sat idle).
        route = self.route_for_new(1) or self.route_for_new(0)
        with self._lock:
            # A cooldown that runs out frees its node for new sequences: the answer holds
            # until the first one does.
            cooldowns = (*self._full_until.values(), *self._avoid_until.values())
            valid_until = min([now + NEW_ROUTE_MAX_AGE_S, *(u for u in cooldowns if u > now)])
            self._new_route = _NewRoute(route, version, valid_until)
        return route

    def _usage(self, block_size: int) -> tuple[dict[str, int], dict[str, int]]:
        with self._lock:
            items = [
                (route, max(self._seq_tokens.get(s, 0), self._seq_reserved.get(s, 0)))
                for s, route in self._seq_route.items()
            ]
        load: dict[str, int] = {}
        used: dict[str, int] = {}
        for route, tokens in items:
            blocks = -(-tokens // block_size) if block_size else 0
            for hop in route.hops:
                load[hop.node_id] = load.get(hop.node_id, 0) + 1
                used[hop.node_id] = used.get(hop.node_id, 0) + blocks
        return load, used


def _with_usage(
    node: Candidate, load: dict[str, int], used: dict[str, int], full: set[str]
) -> Candidate:
    from dataclasses import replace

    room = node.room_blocks
    if node.node_id in full:
        room = 0
    elif room is not None:
        room = max(0, room - used.get(node.node_id, 0))
    return replace(node, load=load.get(node.node_id, 0), room_blocks=room)
