"""The head's signature of the routes it sends, so that a stage knows a route is its head's.

A route travels with every step and release, and a stage lets the node before it on that
route step into and release the head's sequences. The sender writes the route, so without
a signature any member could name itself the node before a stage. The head therefore signs
each route it sends (ECDSA P-256 with SHA-256, the key its node id is the hash of), and a
stage accepts a route from a caller other than the head only with a valid signature by the
head the route starts at. The seal carries the head's public key: a stage checks that its
hash is the route's head id, so no lookup is needed.

What is signed is an explicit byte string (``signed_bytes``), not a protobuf serialization,
which is not canonical. Signing is once per distinct route on the head, verifying once per
distinct (route, seal) on a stage: both keep a small bounded cache, as a head uses few
routes, so steps do not pay for ECDSA each time.

A dropped node can replay a route it was once on; the stage refuses routes naming nodes
their head dropped (molink.pipeline.node_inbound), which covers it.
"""

from __future__ import annotations

import struct
import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from molink.placement.route import Route, RouteSeal
from molink.security.identity import NodeIdentity, node_id_of

SEAL_VERSION = 1
_TAG = b"molink-route-seal"
_SIGNATURE = ec.ECDSA(hashes.SHA256())
CACHE_SIZE = 256  # distinct routes; a head uses a handful at a time

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


def _text(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def signed_bytes(route: Route, version: int = SEAL_VERSION) -> bytes:
    """The bytes a seal signs: a tag and the version, the head id and address, the number
    of hops, then each hop's node id, address, first and end layer. Strings are length
    prefixed (4 bytes, big endian) and integers 8 bytes big endian, so that no two routes
    give the same bytes."""
    parts = [_text(_TAG), struct.pack(">I", version)]
    parts += [_text(route.head_id), _text(route.head_address), struct.pack(">I", len(route.hops))]
    for hop in route.hops:
        parts += [_text(hop.node_id), _text(hop.address), struct.pack(">qq", hop.start, hop.end)]
    return b"".join(parts)


class _Bounded(Generic[K, V]):
    """A small thread-safe LRU map that keeps the ``size`` newest entries."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


class RouteSigner:
    """A head's signer of the routes it sends."""

    def __init__(self, identity: NodeIdentity, cache_size: int = CACHE_SIZE) -> None:
        self._identity = identity
        self._public_key = identity.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._seals: _Bounded[Route, RouteSeal] = _Bounded(cache_size)
        self.signatures_made = 0  # how often signing really ran (the cache missed)

    @property
    def node_id(self) -> str:
        return self._identity.node_id

    def seal(self, route: Route) -> RouteSeal:
        """The seal of ``route``, which must start at this head."""
        if route.head_id != self._identity.node_id:
            raise ValueError(
                f"head {self._identity.node_id} signs only its own routes, not {route.key}"
            )
        seal = self._seals.get(route)
        if seal is None:
            seal = self._sign(route)  # outside any lock: two threads may both sign, harmless
            self._seals.put(route, seal)
        return seal

    def sealed(self, route: Route) -> Route:
        """``route`` carrying this head's seal."""
        return Route(route.hops, route.head_address, self.seal(route))

    def _sign(self, route: Route) -> RouteSeal:
        self.signatures_made += 1
        signature = self._identity.sign(signed_bytes(route))
        return RouteSeal(SEAL_VERSION, self._public_key, signature)


class RouteVerifier:
    """A stage's check of route seals. Only valid seals are kept: a caller sending bad
    ones cannot push the honest routes out of the cache."""

    def __init__(self, cache_size: int = CACHE_SIZE) -> None:
        self._valid: _Bounded[tuple[Route, RouteSeal], bool] = _Bounded(cache_size)
        self.verifications = 0  # how often ECDSA really ran (the cache missed)

    def problem(self, route: Route) -> str | None:
        """None when ``route`` carries a valid seal of the head it starts at, else why not."""
        seal = route.seal
        if seal is None:
            return f"route {route.key} carries no signature of its head {route.head_id}"
        if self._valid.get((route, seal)):
            return None
        problem = self._verify(route, seal)
        if problem is None:
            self._valid.put((route, seal), True)
        return problem

    def _verify(self, route: Route, seal: RouteSeal) -> str | None:
        self.verifications += 1
        if seal.version != SEAL_VERSION:
            return f"route {route.key}: seal version {seal.version}, this node reads {SEAL_VERSION}"
        try:
            key = serialization.load_der_public_key(seal.public_key)
        except ValueError:
            return f"route {route.key}: its seal's public key cannot be read"
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(
            key.curve, ec.SECP256R1
        ):
            return f"route {route.key}: its seal's key is not a P-256 key"
        if node_id_of(key) != route.head_id:
            return f"route {route.key} is signed by node {node_id_of(key)}, not by its head"
        try:
            key.verify(seal.signature, signed_bytes(route, seal.version), _SIGNATURE)
        except InvalidSignature:
            return f"route {route.key}: its head's signature does not match the route"
        return None
