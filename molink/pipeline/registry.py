"""The head's registry of nodes: join checks, and which layers no node serves.

Any number of nodes may serve overlapping spans (replicas); which of them a step takes is
the router's business (molink/placement/router.py), not the registry's.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

from molink.config import LayerRange
from molink.errors import PipelineError
from molink.pipeline.identity import NodeInfo, format_range


class JoinRefusedError(PipelineError):
    """The head refused a node; ``reason`` says why (both sides log it)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class PipelineView:
    """A snapshot of the pipeline as the head sees it. ``stages[0]`` is the head."""

    head_id: str
    head_address: str
    epoch: int
    num_layers: int
    stages: tuple[NodeInfo, ...]

    def missing_ranges(self) -> list[LayerRange]:
        return missing_ranges([s.layers for s in self.stages], self.num_layers)

    def readiness(self) -> str | None:
        """None when every layer is served, else a message naming the missing ranges."""
        return missing_message(self.missing_ranges())

    def stage(self, node_id: str) -> NodeInfo | None:
        return next((s for s in self.stages if s.node_id == node_id), None)

    def min_kv_blocks(self) -> int:
        """The head sizes its block pool to the smallest stage (0: unknown everywhere)."""
        known = [s.num_kv_blocks for s in self.stages if s.num_kv_blocks > 0]
        return min(known) if known else 0


@dataclass(frozen=True)
class RecordTimes:
    """A node's DHT record as the head's discovery watch last saw it."""

    renewed_at: float  # wall time the watch first saw this version of the record
    expires_at: float  # wall time the record expires unless renewed


def missing_ranges(ranges: list[LayerRange], num_layers: int) -> list[LayerRange]:
    """The parts of ``[0, num_layers)`` that no range covers, in order."""
    missing: list[LayerRange] = []
    covered_to = 0
    for rng in sorted(ranges, key=lambda r: r.start):
        if rng.start > covered_to:
            missing.append(LayerRange(covered_to, rng.start))
        covered_to = max(covered_to, rng.end)
    if covered_to < num_layers:
        missing.append(LayerRange(covered_to, num_layers))
    return missing


def missing_message(missing: list[LayerRange]) -> str | None:
    if not missing:
        return None
    spans = [format_range(r) for r in missing]
    listed = spans[0] if len(spans) == 1 else ", ".join(spans[:-1]) + " and " + spans[-1]
    return f"layers {listed} are not served by any node"


class StageRegistry:
    """Which node serves which layers. Thread-safe; every change bumps the epoch."""

    def __init__(self, head: NodeInfo, max_nodes: int = 1024) -> None:
        self._head = head
        # Any member can make itself fresh ids: a pipeline holds at most this many nodes,
        # the head among them (each is pushed to every stage with every change).
        self._max_nodes = max_nodes
        self._lock = threading.Lock()
        self._stages: dict[str, NodeInfo] = {head.node_id: head}
        self._epoch = 1
        # The view of the current epoch: read on every step (routing, submits), changed
        # only by joins and removals, each of which bumps the epoch.
        self._view: PipelineView | None = None

    @property
    def head(self) -> NodeInfo:
        return self._head

    def view(self) -> PipelineView:
        with self._lock:
            return self._view_locked()

    def set_head_address(self, address: str) -> None:
        """The head learns its own port only once its server is bound."""
        with self._lock:
            self._head = self._head.with_address(address)
            self._stages[self._head.node_id] = self._head
            self._epoch += 1

    def join(self, node: NodeInfo) -> PipelineView:
        """Admit ``node`` (replacing an earlier registration of the same id) or raise."""
        with self._lock:
            reason = self._refusal_locked(node)
            if reason is not None:
                raise JoinRefusedError(reason)
            self._stages[node.node_id] = node
            self._epoch += 1
            return self._view_locked()

    def remove(self, node_id: str) -> NodeInfo | None:
        with self._lock:
            if node_id == self._head.node_id:
                return None
            removed = self._stages.pop(node_id, None)
            if removed is not None:
                self._epoch += 1
            return removed

    def overlapping(self, node: NodeInfo) -> list[NodeInfo]:
        """Registered stages (other than ``node``'s own id) whose layers meet ``node``'s."""
        with self._lock:
            return [
                other
                for other in self._stages.values()
                if other.node_id != node.node_id
                and node.layers.start < other.layers.end
                and other.layers.start < node.layers.end
            ]

    def refusal(self, node: NodeInfo) -> str | None:
        with self._lock:
            return self._refusal_locked(node)

    def _view_locked(self) -> PipelineView:
        if self._view is not None and self._view.epoch == self._epoch:
            return self._view
        stages = tuple(sorted(self._stages.values(), key=lambda s: s.layers.start))
        self._view = PipelineView(
            head_id=self._head.node_id,
            head_address=self._head.address,
            epoch=self._epoch,
            num_layers=self._head.model.num_layers,
            stages=stages,
        )
        return self._view

    def _refusal_locked(self, node: NodeInfo) -> str | None:
        head = self._head
        full = node.node_id not in self._stages and len(self._stages) >= self._max_nodes
        checks = (
            _check_text(node),
            _check_numbers(node),
            f"the pipeline already holds {self._max_nodes} nodes (max_pipeline_nodes)"
            if full
            else None,
            _check_protocol(node, head),
            _check_identity(node, head),
            _check_range(node, head),
            _check_blocks(node, head),
        )
        return next((reason for reason in checks if reason is not None), None)


# A joining node's description is kept, pushed to every stage, shown and logged: its text
# is bounded and printable as in a DHT record (molink.discovery.records).
MAX_TEXT_CHARS = 512
MAX_PUBLIC_KEY_BYTES = 1024  # a P-256 key in DER is 91 bytes


def _check_text(node: NodeInfo) -> str | None:
    fields = {
        "node_id": node.node_id,
        "address": node.address,
        "served_name": node.model.served_name,
        "fingerprint": node.model.fingerprint,
        "dtype": node.dtype,
        "wire_dtype": node.wire_dtype,
        "dht_address": node.dht_address,
        "device": node.device,
    }
    for name, value in fields.items():
        if len(value) > MAX_TEXT_CHARS:
            return f"field {name} of a joining node has {len(value)} characters, at most {MAX_TEXT_CHARS}"
        if not value.isprintable():  # shown in terminals and logs: no escape sequences
            return f"field {name} of a joining node holds control or other unprintable characters"
    if len(node.public_key) > MAX_PUBLIC_KEY_BYTES:
        return (
            f"field public_key of a joining node has {len(node.public_key)} bytes, "
            f"at most {MAX_PUBLIC_KEY_BYTES}"
        )
    return None


def _check_numbers(node: NodeInfo) -> str | None:
    """The speeds a node announces, as a DHT record's (molink.discovery.records): the
    router and placement compare them, and NaN compares false with everything."""
    for name in ("throughput_tokens_per_s", "layer_step_s"):
        value = getattr(node, name)
        if not (math.isfinite(value) and value >= 0):
            return f"field {name} of a joining node is {value!r}: a finite number >= 0"
    return None


def _check_protocol(node: NodeInfo, head: NodeInfo) -> str | None:
    if node.protocol_version != head.protocol_version:
        return (
            f"protocol version mismatch: node {node.node_id!r} speaks "
            f"v{node.protocol_version}, head {head.node_id!r} speaks v{head.protocol_version}"
        )
    return None


def _check_identity(node: NodeInfo, head: NodeInfo) -> str | None:
    if not node.node_id:
        return "the node has an empty node id"
    if node.node_id == head.node_id:
        return f"node id {node.node_id!r} is the head's own id"
    if not node.address:
        return f"node {node.node_id!r} advertises no address"
    if node.model.num_layers != head.model.num_layers:
        return (
            f"layer count mismatch: node {node.node_id!r} has a {node.model.num_layers}-layer "
            f"model, head {head.node_id!r} has {head.model.num_layers} layers"
        )
    if (node.model.served_name, node.model.fingerprint) != (
        head.model.served_name,
        head.model.fingerprint,
    ):
        return (
            f"model mismatch: node {node.node_id!r} serves {node.model.served_name!r} "
            f"(fingerprint {node.model.fingerprint}), head {head.node_id!r} serves "
            f"{head.model.served_name!r} (fingerprint {head.model.fingerprint})"
        )
    return None


def _check_range(node: NodeInfo, head: NodeInfo) -> str | None:
    rng, num_layers = node.layers, head.model.num_layers
    if not 0 <= rng.start < rng.end <= num_layers:
        return (
            f"layer range {format_range(rng)} of node {node.node_id!r} is not a non-empty "
            f"part of [0, {num_layers})"
        )
    return None


def _check_blocks(node: NodeInfo, head: NodeInfo) -> str | None:
    # Block ids are allocated by the head and mean the same thing on every stage.
    if node.block_size and head.block_size and node.block_size != head.block_size:
        return (
            f"KV block size mismatch: node {node.node_id!r} uses {node.block_size}, "
            f"head {head.node_id!r} uses {head.block_size}"
        )
    return None
