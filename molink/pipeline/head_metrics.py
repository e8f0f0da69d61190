"""Traffic counters of the head's pipeline, for /metrics and bytes per token."""

from __future__ import annotations

import threading
from dataclasses import dataclass

from molink.pipeline.registry import PipelineView
from molink.transport.generated import molink_pb2 as pb


@dataclass(frozen=True)
class HopCounters:
    messages: int = 0
    bytes: int = 0


class HopTally:
    """Messages and bytes on each hop of the steps that came back (thread-safe)."""

    def __init__(self, head_id: str) -> None:
        self._head_id = head_id
        self._lock = threading.Lock()
        self._hops: dict[tuple[str, str], HopCounters] = {}  # (from, to) node ids

    def count(self, trace: list[pb.HopTrace], sender_id: str, num_bytes: int) -> None:
        """A step's trace names each hop it took; the last node's reply to the head is
        ``num_bytes`` from ``sender_id``."""
        hops = [
            (a.node_id, b.node_id, b.bytes_received) for a, b in zip(trace, trace[1:], strict=False)
        ]
        if sender_id != self._head_id:
            hops.append((sender_id, self._head_id, num_bytes))
        with self._lock:
            for src, dst, size in hops:
                old = self._hops.get((src, dst), HopCounters())
                self._hops[(src, dst)] = HopCounters(old.messages + 1, old.bytes + size)

    def prune(self, view: PipelineView) -> None:
        """Forget the hops to or from nodes no longer in ``view``: a swarm's churn mints
        node ids, and every pair of them would stay counted (and exported) for good."""
        members = {s.node_id for s in view.stages}
        with self._lock:
            for hop in [h for h in self._hops if not (h[0] in members and h[1] in members)]:
                del self._hops[hop]

    def snapshot(self) -> dict[str, HopCounters]:
        """Counters by hop name, "<from>-><to>"."""
        with self._lock:
            return {f"{src}->{dst}": counters for (src, dst), counters in self._hops.items()}


@dataclass(frozen=True)
class PipelineMetrics:
    """Bytes on each hop ("a->b") of the steps that came back, for bytes-per-token."""

    hops: dict[str, HopCounters]
    head_bytes_sent: int  # everything the head streamed, including failed steps
    steps_completed: int
    steps_failed: int
    sampled_tokens: int

    @property
    def bytes_on_wire(self) -> int:
        return sum(hop.bytes for hop in self.hops.values())

    @property
    def bytes_per_token(self) -> float:
        return self.bytes_on_wire / self.sampled_tokens if self.sampled_tokens else 0.0

    def metric_lines(self) -> list[str]:
        """Prometheus counters of the traffic, for /metrics (bytes per token = the sum of
        molink:pipeline_bytes_sent_total over hops / molink:pipeline_sampled_tokens_total)."""
        lines: list[str] = []
        for name, help_text, field in (
            ("molink:pipeline_bytes_sent_total", "Bytes sent on each hop by completed steps.", "bytes"),
            ("molink:pipeline_messages_total", "Messages sent on each hop by completed steps.", "messages"),
        ):  # fmt: skip
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter"]
            for hop, counters in sorted(self.hops.items()):
                lines.append(f'{name}{{hop="{_label(hop)}"}} {getattr(counters, field)}')
        for name, help_text, value in (
            ("molink:pipeline_head_bytes_sent_total", "Bytes the head streamed, failed steps included.", self.head_bytes_sent),
            ("molink:pipeline_sampled_tokens_total", "Tokens sampled by completed steps.", self.sampled_tokens),
        ):  # fmt: skip
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} counter", f"{name} {value}"]
        name = "molink:pipeline_steps_total"
        lines += [f"# HELP {name} Steps that came back, by outcome.", f"# TYPE {name} counter"]
        lines.append(f'{name}{{outcome="completed"}} {self.steps_completed}')
        lines.append(f'{name}{{outcome="failed"}} {self.steps_failed}')
        return lines


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def swarm_metric_lines(view: PipelineView, route_choices: dict[str, int]) -> list[str]:
    """How many nodes serve each layer, how many layers are covered, and which routes new
    sequences took."""
    name = "molink:layer_replicas"
    lines = [f"# HELP {name} Nodes serving each layer.", f"# TYPE {name} gauge"]
    counts = [
        sum(1 for s in view.stages if s.layers.start <= layer < s.layers.end)
        for layer in range(view.num_layers)
    ]
    for layer, count in enumerate(counts):
        lines.append(f'{name}{{layer="{layer}"}} {count}')
    name = "molink:layers_covered"
    lines += [
        f"# HELP {name} Layers served by at least one node (of molink:layers_total).",
        f"# TYPE {name} gauge",
        f"{name} {sum(1 for c in counts if c)}",
    ]
    name = "molink:layers_total"
    lines += [f"# HELP {name} Layers of the model.", f"# TYPE {name} gauge"]
    lines.append(f"{name} {view.num_layers}")
    name = "molink:route_sequences_total"
    lines += [f"# HELP {name} Sequences sent along each route.", f"# TYPE {name} counter"]
    for key, count in sorted(route_choices.items()):
        lines.append(f'{name}{{route="{_label(key)}"}} {count}')
    return lines
