"""What the dashboard shows of the swarm: one versioned, JSON-ready snapshot.

Any view of the swarm (today the head's registry, health checks and link estimates; later
the DHT's records) is turned into a ``SwarmSnapshot`` by a ``SwarmProvider``; the pages
only ever read this shape (``to_json``), so a new source needs no change to them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

SNAPSHOT_VERSION = 1

# alive: answers; slow: answers but reports trouble or falls far behind its peers;
# missing: its last renewals (health checks, records) failed; dead: dropped from the swarm;
# banned: refused by the swarm.
Health = Literal["alive", "slow", "missing", "dead", "banned"]
SERVING_HEALTH: frozenset[str] = frozenset({"alive", "slow"})


@dataclass(frozen=True)
class NodeView:
    node_id: str
    address: str
    start: int  # layers [start, end)
    end: int
    health: Health
    detail: str = ""  # why it is not alive, or what it reports
    device: str = ""  # "cpu", "cuda:0", ...; "" when the node does not say
    memory_total_bytes: int | None = None  # that device's memory (None: not reported)
    memory_free_bytes: int | None = None
    dtype: str = ""
    step_time_s: float | None = None  # smoothed compute time of one step
    queued_steps: int | None = None
    active_sequences: int | None = None
    kv_free_tokens: int | None = None
    kv_total_tokens: int | None = None
    record_age_s: float | None = None  # time since the node last renewed (answered)
    record_expires_s: float | None = None  # until its DHT record expires (None: no DHT)
    is_head: bool = False


@dataclass(frozen=True)
class LinkView:
    source: str  # node ids
    target: str
    bandwidth_bytes_per_s: float | None  # None until a large enough message was timed
    rtt_s: float | None
    samples: int


@dataclass(frozen=True)
class Span:
    start: int
    end: int


@dataclass(frozen=True)
class SwarmSnapshot:
    model: str
    num_layers: int
    nodes: tuple[NodeView, ...]
    links: tuple[LinkView, ...] = ()
    routes: tuple[tuple[str, ...], ...] = ()  # node ids, head first, of each route in use
    failovers_total: int = 0  # requests moved to another route after a node failed
    replays_total: int = 0  # steps sent again after a failure
    taken_at: float = 0.0  # unix time
    version: int = field(default=SNAPSHOT_VERSION)

    def coverage(self) -> list[int]:
        """How many serving nodes hold each layer."""
        counts = [0] * self.num_layers
        for node in self.nodes:
            if node.health in SERVING_HEALTH:
                for layer in range(max(0, node.start), min(self.num_layers, node.end)):
                    counts[layer] += 1
        return counts

    def missing_spans(self) -> list[Span]:
        """Maximal runs of layers no serving node holds."""
        spans: list[Span] = []
        start: int | None = None
        for layer, count in enumerate([*self.coverage(), 1]):
            if count == 0 and start is None:
                start = layer
            elif count > 0 and start is not None:
                spans.append(Span(start, layer))
                start = None
        return spans

    def to_json(self) -> dict:
        body = asdict(self)
        body["routes"] = [list(route) for route in self.routes]
        body["coverage"] = self.coverage()
        body["missing_spans"] = [asdict(span) for span in self.missing_spans()]
        return body


class SwarmProvider(Protocol):
    def snapshot(self) -> SwarmSnapshot:
        """The swarm as of now; called about once a second, from the event loop."""

    def route(self) -> tuple[str, ...]:
        """Node ids, head first, that a request started now goes through."""
