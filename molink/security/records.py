"""Signed, expiring records: what a node announces about itself, signed with its key.

A record's payload is whatever the announcing layer serializes (its own versioned schema);
this module binds it to the announcing node and to a time window. The signature (ECDSA
P-256 over SHA-256, from the ``cryptography`` package) covers a fixed context string, the
issue and expiry times and the payload; the signer's member certificate travels with the
record, so any member can check it without a prior exchange: the certificate must come
from the swarm's authority, its key must be the node id the record claims, and the
signature must verify under it. A record that is unsigned, signed by a non-member or by
another node, expired, or older than one already seen from that node (a replay) is ignored
with the reason.
"""

from __future__ import annotations

import math
import struct
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from molink.security.authority import SwarmAuthority
from molink.security.identity import NodeIdentity, node_id_of_certificate, verify_signature

_CONTEXT = b"molink signed record v1\0"
_TIMES = struct.Struct(">dd")


def _signed_bytes(payload: bytes, issued_at: float, expires_at: float) -> bytes:
    return _CONTEXT + _TIMES.pack(issued_at, expires_at) + payload


@dataclass(frozen=True)
class SignedRecord:
    payload: bytes
    certificate: bytes  # the signer's member certificate, DER
    signature: bytes
    issued_at: float  # seconds since the epoch
    expires_at: float


def sign_record(
    identity: NodeIdentity, payload: bytes, ttl_s: float, now: float | None = None
) -> SignedRecord:
    if identity.certificate is None:
        raise ValueError(f"node {identity.node_id} has no member certificate to sign with")
    issued_at = time.time() if now is None else now
    expires_at = issued_at + ttl_s
    return SignedRecord(
        payload=payload,
        certificate=identity.certificate.public_bytes(serialization.Encoding.DER),
        signature=identity.sign(_signed_bytes(payload, issued_at, expires_at)),
        issued_at=issued_at,
        expires_at=expires_at,
    )


class RecordVerifier:
    """Checks records against the swarm's authority and remembers, per node, the newest
    issue time accepted, so that an older record replayed later is refused."""

    _MAX_NODES = 100_000

    def __init__(
        self,
        authority: SwarmAuthority,
        clock: Callable[[], float] = time.time,
        max_clock_skew_s: float = 60.0,
    ) -> None:
        self._authority = authority
        self._clock = clock
        self._skew = max_clock_skew_s
        self._lock = threading.Lock()
        self._newest: OrderedDict[str, float] = OrderedDict()

    def check(self, record: SignedRecord | None, node_id: str) -> str | None:
        """None when ``record`` is a valid, fresh record of ``node_id``; else why not."""
        if record is None or not record.signature or not record.certificate:
            return "unsigned"
        try:
            certificate = x509.load_der_x509_certificate(record.certificate)
        except ValueError:
            return "its certificate cannot be parsed"
        if not self._authority.is_member(certificate):
            return "signed by a non-member (certificate not issued by this swarm)"
        if node_id_of_certificate(certificate) != node_id:
            return f"signed by another node than {node_id}"
        signed = _signed_bytes(record.payload, record.issued_at, record.expires_at)
        if not verify_signature(certificate, signed, record.signature):
            return "bad signature"
        # A signature proves who wrote the times, not that they are numbers: a NaN
        # issued_at compares false with everything, so kept as the node's newest it would
        # let every replay through, and a NaN or infinite expires_at would never expire.
        for field, value in (("issued_at", record.issued_at), ("expires_at", record.expires_at)):
            if not math.isfinite(value):
                return f"{field} is {value!r}: record times must be finite seconds"
        now = self._clock()
        if record.expires_at <= now:
            return f"expired {now - record.expires_at:.0f}s ago"
        if record.issued_at > now + self._skew:
            return "issued in the future"
        return self._note_fresh(node_id, record.issued_at)

    def _note_fresh(self, node_id: str, issued_at: float) -> str | None:
        with self._lock:
            newest = self._newest.get(node_id)
            if newest is not None and issued_at < newest:
                return "replayed: older than a record already seen from this node"
            self._newest[node_id] = issued_at
            self._newest.move_to_end(node_id)
            while len(self._newest) > self._MAX_NODES:
                self._newest.popitem(last=False)
        return None
