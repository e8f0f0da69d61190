"""The routing rule: the route with the shortest expected step time, by Dijkstra.

A step of a sequence visits every node of its route once and comes back to the head, so
the time one step takes on a route is, in this model::

    T(route) = sum over its nodes n   of  node_s(n)
             + sum over its hops a->b of  link_s(a, b)        (the last hop is back to the head)

    node_s(n)    = step_s(n) * (1 + queued(n) + load(n) / ROWS_PER_STEP)
                 + per_seq_s(n) * (load(n) + 1)
    link_s(a, b) = rtt(a, b) / 2 + step_bytes * (load(b) + 1) / bandwidth(a, b)

``step_s`` is the node's measured compute time per step, ``queued`` the steps waiting in
its queue (as it last reported), ``per_seq_s`` its measured marginal time per token, and
``load`` the sequences this head already keeps on it, so that each new sequence raises
the cost of the nodes it would join: equal replicas share the work and a faster or closer
one takes more of it. A node not measured yet (just joined or restarted) is taken to be
as fast per layer and as near as the measured nodes (their medians), not as fast and near
as the priors, which would send it every new sequence until it is measured; while no node
is measured (a burst at start), each is taken at the step time it announced (its probe at
start), so that the load term weighs what a step really costs. ``load`` counts the sequences admitted a moment ago too, which the
node's reported queue cannot show yet: a step carries about ``ROWS_PER_STEP`` sequences,
so each sequence kept on a node adds that share of a step to the work queued there. The
per-token term alone is too small to spread a burst: on a CPU a decode step's time hardly
depends on its rows, so two replicas whose measured step times differ by noise would see
a whole burst of new sequences go to the one measured faster. Unknown measurements fall back to priors (``PRIOR_*``), and a hop
nobody has measured yet takes the head's own round trip to its receiving node.

Nodes whose spans meet exactly (``a.end == b.start``) are joined by an edge; the head is the
source and any node that ends at the last layer, plus its hop back, the target. Edge costs
depend on the previous node (the link), so the search runs over nodes, not over layer
boundaries. Nodes without room for the sequence's KV are left out.
"""

from __future__ import annotations

import heapq
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from molink.placement.route import Route, RouteHop

PRIOR_STEP_S = 0.01  # compute per step of a node never measured
PRIOR_PER_SEQ_S = 0.001  # marginal compute per sequence of a node never measured
PRIOR_RTT_S = 0.001  # round trip of a hop with no measurement and no probe
ROWS_PER_STEP = 8  # sequences one step of a node is expected to carry


@dataclass(frozen=True)
class Candidate:
    """One node as the router sees it."""

    node_id: str
    address: str
    start: int
    end: int
    step_s: float = 0.0  # measured compute per step; 0: unknown
    per_seq_s: float = 0.0  # measured marginal compute per token; 0: unknown
    queued: int = 0
    load: int = 0  # sequences this head has on it
    room_blocks: int | None = None  # KV blocks it may still give this head; None: unknown
    rtt_s: float = 0.0  # the head's measured round trip to it; 0: unknown
    # Its own probe of one step at start (layer_step_s times its layers); 0: none.
    announced_step_s: float = 0.0

    def node_s(self) -> float:
        step = self.step_s if self.step_s > 0 else PRIOR_STEP_S
        per_seq = self.per_seq_s if self.per_seq_s > 0 else PRIOR_PER_SEQ_S
        return step * (1 + self.queued + self.load / ROWS_PER_STEP) + per_seq * (self.load + 1)


@dataclass(frozen=True)
class LinkCost:
    bandwidth_bytes_per_s: float
    rtt_s: float


# (from node id, to node id) -> the measured link, or None
LinkLookup = Callable[[str, str], LinkCost | None]


def link_s(sender: Candidate, receiver: Candidate, step_bytes: float, links: LinkLookup) -> float:
    measured = links(sender.node_id, receiver.node_id)
    rtt = receiver.rtt_s if receiver.rtt_s > 0 else PRIOR_RTT_S
    bandwidth = math.inf
    if measured is not None:
        # Nodes report their own links: a number that is no measurement (NaN, negative,
        # zero, an infinite round trip) counts as none, not as an endless hop (which left
        # the head without a route when there was no other way round).
        if 0 < measured.rtt_s < math.inf:
            rtt = measured.rtt_s
        if measured.bandwidth_bytes_per_s > 0:  # +inf: no rate measured yet
            bandwidth = measured.bandwidth_bytes_per_s
    return rtt / 2 + step_bytes * (receiver.load + 1) / bandwidth


def best_route(
    head: Candidate,
    nodes: Sequence[Candidate],
    num_layers: int,
    head_address: str,
    *,
    step_bytes: float = 0.0,
    links: LinkLookup = lambda a, b: None,
    blocks_needed: int = 0,
) -> tuple[Route, float] | None:
    """The cheapest route from ``head`` (which serves ``[0, head.end)``) to the last layer,
    with its expected step time; None when no chain of nodes covers every layer."""
    usable = with_peer_speeds(
        [
            n
            for n in nodes
            if n.node_id != head.node_id
            and n.start < n.end
            and (n.room_blocks is None or n.room_blocks >= blocks_needed)
        ]
    )
    by_start: dict[int, list[Candidate]] = {}
    for node in usable:
        by_start.setdefault(node.start, []).append(node)
    best: dict[str, float] = {head.node_id: head.node_s()}
    previous: dict[str, Candidate] = {}
    queue: list[tuple[float, str, Candidate]] = [(best[head.node_id], head.node_id, head)]
    finish: tuple[float, Candidate] | None = None
    while queue:
        cost, _, node = heapq.heappop(queue)
        if cost > best.get(node.node_id, math.inf):
            continue
        if node.end == num_layers:
            total = cost + link_s(node, head, step_bytes, links) if node is not head else cost
            if finish is None or total < finish[0]:
                finish = (total, node)
            continue
        for nxt in by_start.get(node.end, []):
            new_cost = cost + link_s(node, nxt, step_bytes, links) + nxt.node_s()
            if new_cost < best.get(nxt.node_id, math.inf):
                best[nxt.node_id] = new_cost
                previous[nxt.node_id] = node
                heapq.heappush(queue, (new_cost, nxt.node_id, nxt))
    if finish is None:
        return None
    chain = [finish[1]]
    while chain[-1].node_id != head.node_id:
        chain.append(previous[chain[-1].node_id])
    hops = tuple(RouteHop(n.node_id, n.address, n.start, n.end) for n in reversed(chain))
    return Route(hops, head_address), finish[0]


def with_peer_speeds(nodes: list[Candidate]) -> list[Candidate]:
    """Nodes with no measured compute get the measured nodes' median compute per layer,
    times their own layers (their own announced step while none is measured); nodes with no measured round trip get the measured nodes'
    median round trip (nothing changes while no node is measured)."""
    timed = [n for n in nodes if n.step_s > 0]
    probed = [n.rtt_s for n in nodes if n.rtt_s > 0]
    step = statistics.median(n.step_s / (n.end - n.start) for n in timed) if timed else 0.0
    per_seq = statistics.median(n.per_seq_s / (n.end - n.start) for n in timed) if timed else 0.0
    rtt = statistics.median(probed) if probed else 0.0
    return [_with_priors(n, step, per_seq, rtt) for n in nodes]


def _with_priors(node: Candidate, step: float, per_seq: float, rtt: float) -> Candidate:
    if node.step_s <= 0 and step > 0:
        layers = node.end - node.start
        node = replace(node, step_s=step * layers, per_seq_s=per_seq * layers)
    elif node.step_s <= 0 and node.announced_step_s > 0:
        node = replace(node, step_s=node.announced_step_s)
    if node.rtt_s <= 0 and rtt > 0:
        node = replace(node, rtt_s=rtt)
    return node


def unreachable_layers(head: Candidate, nodes: Sequence[Candidate], num_layers: int) -> int | None:
    """The first layer no chain from the head reaches (None: the last layer is reached)."""
    reached = {head.end}
    frontier = [head.end]
    while frontier:
        boundary = frontier.pop()
        for node in nodes:
            if node.start == boundary and node.end not in reached:
                reached.add(node.end)
                frontier.append(node.end)
    if num_layers in reached:
        return None
    return max(reached)
