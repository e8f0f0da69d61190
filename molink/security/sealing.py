"""Records a member publishes in the swarm's DHT: signed by the node, sealed for members.

hivemind's DHT runs over its own libp2p daemon, not over the swarm's gRPC, and that daemon
has no notion of membership (no private-network key, no client certificates): anyone who
can reach a node's DHT port can join the DHT's routing (ping, find). The protection is
therefore in the records themselves:

- every record is signed by its node's key and carries the node's member certificate
  (``molink.security.records``), so only members can produce a record a member accepts,
  only for their own node id, and an expired or replayed (older) record is ignored;
- the signed record is then encrypted with AES-256-GCM (``cryptography``'s AEAD) under a
  key derived from the swarm key, and kept under a DHT key derived from it too, so an
  outsider can neither find the swarm's records nor read the topology in them;
- members' DHT nodes run ``SealedRecordValidator`` (molink.security.dht_validator): hivemind calls it on every record
  another peer asks them to store and on every record a peer returns, so an outsider's
  (or a wrong key's) store is refused on every member and changes no state there.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import msgpack  # hivemind's own value format; plain data only, nothing is unpickled
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from molink.security.credentials import SwarmCredentials
from molink.security.records import RecordVerifier, SignedRecord, sign_record

_VERSION = b"MLS1"
_NONCE_BYTES = 12
_AAD = b"molink sealed dht record v1"
_MAX_SEALED_BYTES = 64 * 1024  # a record is a few hundred bytes; refuse anything huge


class RecordSeal:
    """Seals this node's records and opens other members' (with a replay memory)."""

    def __init__(self, credentials: SwarmCredentials, clock: Callable[[], float] = time.time):
        authority = credentials.authority
        if not authority.sealing_key:
            raise ValueError(f"{authority.name} has no sealing key (not derived from a swarm key)")
        self._identity = credentials.identity
        self._aead = AESGCM(authority.sealing_key)
        self._verifier = RecordVerifier(authority, clock=clock)
        self._namespace = authority.namespace

    def scoped(self, key: str) -> str:
        """The DHT key the swarm keeps ``key``'s records under (unguessable without the key)."""
        return f"molink-swarm/{self._namespace}/{key}"

    def seal(self, payload: bytes, ttl_s: float, now: float | None = None) -> bytes:
        record = sign_record(self._identity, payload, ttl_s, now)
        plain = msgpack.packb(
            [
                record.payload,
                record.certificate,
                record.signature,
                record.issued_at,
                record.expires_at,
            ]
        )
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plain, _AAD)

    def open(self, sealed: object, node_id: str) -> tuple[SignedRecord | None, str]:
        """(record, "") for a valid, fresh record of member ``node_id``; else (None, why)."""
        record, reason = self._unseal(sealed)
        if record is None:
            return None, reason
        reason = self._verifier.check(record, node_id)
        if reason is not None:
            return None, reason
        return record, ""

    def _unseal(self, sealed: object) -> tuple[SignedRecord | None, str]:
        if not isinstance(sealed, bytes) or not sealed.startswith(_VERSION):
            return None, "unsigned (not a sealed record of this swarm)"
        if len(sealed) > _MAX_SEALED_BYTES:
            return None, f"a sealed record of {len(sealed)} bytes (at most {_MAX_SEALED_BYTES})"
        body = sealed[len(_VERSION) :]
        try:
            plain = self._aead.decrypt(body[:_NONCE_BYTES], body[_NONCE_BYTES:], _AAD)
        except (InvalidTag, ValueError):
            return None, "not sealed with this swarm's key"
        return _signed_record_of(plain)


def _signed_record_of(plain: bytes) -> tuple[SignedRecord | None, str]:
    try:
        fields = msgpack.unpackb(plain, raw=False)
    except (ValueError, msgpack.UnpackException):
        return None, "a sealed record that is not msgpack"
    if not isinstance(fields, list) or len(fields) != 5:
        return None, "a sealed record of the wrong shape"
    payload, certificate, signature, issued_at, expires_at = fields
    if not all(isinstance(v, bytes) for v in (payload, certificate, signature)) or not all(
        isinstance(t, float) for t in (issued_at, expires_at)
    ):
        return None, "a sealed record with fields of the wrong type"
    return SignedRecord(payload, certificate, signature, issued_at, expires_at), ""
