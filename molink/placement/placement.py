"""Which layers a node that joins without layer flags should serve.

The rule, in order:

1. A head without a route comes first: the node takes the shortest span its memory holds
   that joins the head's chain of meeting spans to a chain that reaches the last layer
   (layers no node serves, or spans that overlap without meeting). When none fits, layers
   no node serves are taken from the first, as far as its memory allows (the next node
   goes on from there); when none are missing, it becomes a replica (rule 2) if another
   head has a route, else it is an error.
2. Otherwise it becomes a replica where the swarm is weakest. Every layer's *strength*
   is the throughput of the nodes serving it (a node that has measured none counts as
   1 token/s), and the node takes the span of an existing node (so that routes can use it
   in place of that node) whose weakest layer is the weakest, as far as its memory allows.
   Ties go to the span that starts first.
3. A replica is sized by speed, not by layer count: when this node and the node(s) already
   serving that span have measured their speed (seconds per layer for one probe step, see
   molink/stage/speed.py), it takes layers in proportion, ``span length * their seconds
   per layer / its own``, against the slowest of them (the weakest coverage): a node twice
   as fast takes twice the layers, one half as fast half of them, so that a step takes
   each node about as long and no stage is the pipeline's bottleneck. Memory still caps
   it, and it never runs past the model's last layer. Speed ratios within SPEED_DEADBAND
   count as equal: a probe of a few milliseconds varies that much between runs on a busy
   machine, and resizing for less would make spans differ for noise. Without both
   measurements it takes the span as it is.
4. A replica ends where a route can go on from it: where another node's span starts, or
   at the model's last layer (a route passes from one node to the next only where one
   span ends and the next starts, so a replica ending elsewhere would be on no route). Of
   those ends, it takes the one nearest the size of rule 3 that its memory holds; when
   none fits, the next weakest span is tried, and when none fits anywhere, it is an error.

Layers below the end of the heads' own spans are left out: a head computes its own layers,
so a replica of them would never be on a route. Nor does a head's span count as serving
layers for anyone: a head with a longer span than another serves none of the other's
routes, whose next node must start where that head's span ends. The size comes from
``max_layers``, what the node's memory holds (molink/placement/resident.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from molink.errors import PipelineError

SPEED_DEADBAND = 1.5  # speed ratios closer to 1 than this factor count as equal
_MAX_SIZED_LAYERS = float(2**31)  # far above any model's layer count


@dataclass(frozen=True)
class ServedSpan:
    start: int
    end: int
    throughput: float = 0.0  # tokens per second measured by the node; 0: unknown
    layer_step_s: float = 0.0  # seconds per layer of its probe step; 0: not measured


@dataclass(frozen=True)
class Placement:
    start: int
    end: int
    reason: str


def choose_span(
    num_layers: int, served: Sequence[ServedSpan], max_layers: int, layer_step_s: float = 0.0
) -> Placement:
    """``layer_step_s``: this node's own measured seconds per layer (0: not measured).
    Spans that are not part of the model (as a peer may report them) are left out: no
    route could use them."""
    if max_layers < 1:
        raise PipelineError(
            "this node's memory holds no layer of the model (see --molink-max-memory)"
        )
    served = [s for s in served if 0 <= s.start < s.end <= num_layers]
    floor = min((s.end for s in served if s.start == 0), default=0)
    strength = [0.0] * num_layers
    for span in served:
        if span.start == 0:
            continue  # a head: it computes its layers for its own routes only
        for layer in range(span.start, span.end):
            strength[layer] += span.throughput if span.throughput > 0 else 1.0
    joining = _join(num_layers, served, max_layers)
    if joining is not None and joining[1] - joining[0] <= max_layers:
        start, end = joining
        why = (
            "were served by no node"
            if all(strength[layer] == 0 for layer in range(start, end))
            else "join spans that do not meet: no route reached the last layer"
        )
        return Placement(start, end, f"layers [{start}, {end}) {why} (memory holds {max_layers})")
    missing = next((layer for layer in range(floor, num_layers) if strength[layer] == 0), None)
    if missing is None and joining is not None and not _some_head_routed(num_layers, served):
        start, end = joining
        raise PipelineError(
            f"this node's memory holds {max_layers} layer(s), too few to give a head a route: "
            f"the shortest span that would, [{start}, {end}), has {end - start} (see "
            "--molink-max-memory, or give the layers)"
        )
    if missing is not None:
        end = missing
        while end < num_layers and strength[end] == 0 and end - missing < max_layers:
            end += 1
        return Placement(
            missing,
            end,
            f"layers [{missing}, {end}) were served by no node (memory holds {max_layers})",
        )
    candidates = sorted({(s.start, s.end) for s in served if s.start >= floor and s.start > 0})
    if not candidates:
        raise PipelineError("every layer is served and no span beyond the heads' own to replicate")
    for start, end in sorted(candidates, key=lambda c: (min(strength[c[0] : c[1]]), c[0])):
        weakest = min(strength[start:end])
        size, why = speed_sized(end - start, _slowest(served, start, end), layer_step_s)
        usable = _usable_end(served, num_layers, start, start + size, start + max_layers)
        if usable is None:
            continue  # no span that a route can use fits in memory here
        if usable != start + size:
            why += f", to layer {usable}, where a route goes on"
        return Placement(
            start,
            usable,
            f"layers from {start} are the weakest served (strength {weakest:g} tokens/s): "
            f"this node becomes a replica there; {why} (memory holds {max_layers})",
        )
    shortest = min(candidates, key=lambda c: c[1] - c[0])
    raise PipelineError(
        f"this node's memory holds {max_layers} layer(s), too few for a replica a route can "
        f"use: a route goes from one node to the next only where a span ends and another "
        f"starts, and the shortest span here, [{shortest[0]}, {shortest[1]}), has "
        f"{shortest[1] - shortest[0]} (see --molink-max-memory, or give the layers)"
    )


def _join(num_layers: int, served: Sequence[ServedSpan], most: int) -> tuple[int, int] | None:
    """For the first head (by its span's end) that has no route, the shortest span joining
    its chain of meeting spans to one that reaches the last layer: the shortest of those
    within ``most`` layers, else the shortest of all. None when every head has a route."""
    nodes = [s for s in served if s.start > 0]
    finishing = {num_layers}  # boundaries from which a chain of nodes reaches the end
    while grown := {s.start for s in nodes if s.end in finishing} - finishing:
        finishing |= grown
    for head_end in sorted({s.end for s in served if s.start == 0}):
        reached = _reached(nodes, head_end)
        if num_layers in reached:
            continue
        joins = [(e - r, r, e) for r in reached for e in finishing if r < e]
        _, start, end = min([j for j in joins if j[0] <= most] or joins)
        return start, end
    return None


def _some_head_routed(num_layers: int, served: Sequence[ServedSpan]) -> bool:
    nodes = [s for s in served if s.start > 0]
    heads = {s.end for s in served if s.start == 0}
    return any(num_layers in _reached(nodes, head_end) for head_end in heads)


def _reached(nodes: Sequence[ServedSpan], start: int) -> set[int]:
    """The boundaries a chain of meeting spans reaches from ``start``."""
    reached, frontier = {start}, [start]
    while frontier:
        boundary = frontier.pop()
        for span in nodes:
            if span.start == boundary and span.end not in reached:
                reached.add(span.end)
                frontier.append(span.end)
    return reached


def _usable_end(
    served: Sequence[ServedSpan], num_layers: int, start: int, wanted: int, most: int
) -> int | None:
    """The end nearest ``wanted`` and at most ``most`` at which a route can go on from a
    span starting at ``start``: where a served span starts, or the model's end (a replica
    ending anywhere else is on no route). Ties go to the shorter span; None: none fits."""
    ends = {s.start for s in served if s.start > start} | {num_layers}
    fitting = [end for end in ends if end <= most]
    return min(fitting, key=lambda end: (abs(end - wanted), end), default=None)


def _slowest(served: Sequence[ServedSpan], start: int, end: int) -> float:
    """The largest measured seconds per layer among the nodes serving [start, end); 0: none."""
    return max(
        (s.layer_step_s for s in served if (s.start, s.end) == (start, end)),
        default=0.0,
    )


def speed_sized(span_layers: int, theirs_s: float, mine_s: float) -> tuple[int, str]:
    """How many layers a replica of a ``span_layers`` span takes, given the slowest current
    server's and this node's seconds per layer (rule 3), and why."""
    if theirs_s <= 0 or mine_s <= 0:
        return span_layers, f"{span_layers} layer(s) as served (speeds not measured on both)"
    ratio = theirs_s / mine_s  # > 1: this node is faster
    if 1 / SPEED_DEADBAND < ratio < SPEED_DEADBAND:
        return span_layers, f"{span_layers} layer(s) as served (speed x{ratio:.2f}: about equal)"
    # Speeds come from peers' records: a ratio of extreme (finite) speeds can overflow,
    # and no replica takes more layers than a model has anyway (its end caps it).
    size = max(1, round(min(span_layers * ratio, _MAX_SIZED_LAYERS)))
    return size, (
        f"{size} layer(s) for its speed x{ratio:.2f} of the slowest node serving them "
        f"({mine_s * 1e3:.3g} vs {theirs_s * 1e3:.3g} ms per layer)"
    )
