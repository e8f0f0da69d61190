"""A route: the chain of nodes one step travels, head first.

Spans meet exactly at their boundaries and together cover ``[0, num_layers)``. A route
travels with every step, so nodes keep no next hop of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RouteHop:
    node_id: str
    address: str
    start: int  # the layers this node computes on this route: [start, end)
    end: int


@dataclass(frozen=True)
class RouteSeal:
    """The head's signature of a route (molink.security.route_seal): its public key (DER
    SubjectPublicKeyInfo), whose hash is the head's node id, and the signature."""

    version: int
    public_key: bytes
    signature: bytes


@dataclass(frozen=True)
class Route:
    hops: tuple[RouteHop, ...]
    head_address: str
    # The seal a received route came with, passed on unchanged to the next hop. It is no
    # part of the route's identity: equal routes compare and hash equal with or without it.
    seal: RouteSeal | None = field(default=None, compare=False, repr=False)

    @property
    def key(self) -> str:
        """Names the route by its nodes, e.g. ``head->a->b``."""
        return "->".join(hop.node_id for hop in self.hops)

    @property
    def head_id(self) -> str:
        return self.hops[0].node_id if self.hops else ""

    def index_of(self, node_id: str) -> int | None:
        for index, hop in enumerate(self.hops):
            if hop.node_id == node_id:
                return index
        return None

    def next_after(self, node_id: str) -> RouteHop | None:
        index = self.index_of(node_id)
        if index is None or index + 1 >= len(self.hops):
            return None
        return self.hops[index + 1]

    def contains(self, node_id: str) -> bool:
        return self.index_of(node_id) is not None

    def problem(self, num_layers: int) -> str | None:
        """None for a well-formed route over ``num_layers`` layers, else what is wrong."""
        if not self.hops:
            return "the route is empty"
        ids = [hop.node_id for hop in self.hops]
        if len(set(ids)) != len(ids):
            return f"route {self.key} names a node twice"
        covered = 0
        for hop in self.hops:
            if hop.start != covered or hop.end <= hop.start:
                return (
                    f"route {self.key}: node {hop.node_id} serves [{hop.start}, {hop.end}) "
                    f"where layer {covered} should start"
                )
            covered = hop.end
        if covered != num_layers:
            return f"route {self.key} ends at layer {covered}, not at {num_layers}"
        return None
