"""Which layers a node that joins without layer flags should serve.

The rule, in order:

1. Layers no node serves come first: the node takes the first missing range, from its
   start, as far as its memory allows.
2. Otherwise it becomes a replica where the swarm is weakest. Every layer's *strength*
   is the throughput of the nodes serving it (a node that has measured none counts as
   1 token/s), and the node takes the span of an existing node (so that routes can use it
   in place of that node) whose weakest layer is the weakest, as far as its memory allows.
   Ties go to the span that starts first.

Layers below the end of the heads' own spans are left out: a head computes its own layers,
so a replica of them would never be on a route. The size comes from ``max_layers``, what
the node's memory holds (``layers_that_fit``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from molink.errors import PipelineError


@dataclass(frozen=True)
class ServedSpan:
    start: int
    end: int
    throughput: float = 0.0  # tokens per second measured by the node; 0: unknown


@dataclass(frozen=True)
class Placement:
    start: int
    end: int
    reason: str


def layers_that_fit(
    budget_bytes: int, weight_bytes_per_layer: int, kv_reserve_bytes_per_layer: int
) -> int:
    """How many layers a node's memory holds: their weights plus a minimum KV reserve."""
    per_layer = weight_bytes_per_layer + kv_reserve_bytes_per_layer
    return max(0, budget_bytes // per_layer) if per_layer > 0 else 0


def choose_span(num_layers: int, served: Sequence[ServedSpan], max_layers: int) -> Placement:
    if max_layers < 1:
        raise PipelineError(
            "this node's memory holds no layer of the model (see --molink-max-memory)"
        )
    floor = min((s.end for s in served if s.start == 0), default=0)
    strength = [0.0] * num_layers
    for span in served:
        for layer in range(span.start, span.end):
            strength[layer] += span.throughput if span.throughput > 0 else 1.0
    missing = next((layer for layer in range(floor, num_layers) if strength[layer] == 0), None)
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
    start, end = min(candidates, key=lambda c: (min(strength[c[0] : c[1]]), c[0]))
    end = min(end, start + max_layers)
    weakest = min(strength[start:end])
    return Placement(
        start,
        end,
        f"layers [{start}, {end}) are the weakest served (strength {weakest:g} tokens/s): "
        "this node becomes a replica there",
    )
