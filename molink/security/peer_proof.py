"""Proof that a call reached the node its caller meant, not just some swarm member.

TLS proves only that the server holds a member certificate, and any member can issue one
(the swarm authority derives from the shared key); gRPC's Python client does not show the
caller which certificate the server presented. So a caller that expects a node id (one
it read from a route, a registry or a DHT record) sends a fresh nonce in the call's
metadata, and the server answers in its initial metadata with its public key and an ECDSA
signature over the nonce, the caller's id as the server's TLS saw it, and the server's
own id. The caller checks that the key hashes to the id it expected and that the
signature covers its own id: a member in the middle that relayed the nonce to the real
node would get a signature over its own id, not the caller's.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import grpc
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from molink.security.credentials import peer_node_id
from molink.security.identity import NodeIdentity, node_id_of

NONCE_KEY = "molink-proof-nonce-bin"
PUBLIC_KEY_KEY = "molink-proof-key-bin"
SIGNATURE_KEY = "molink-proof-sig-bin"
NONCE_BYTES = 16
_CONTEXT = b"molink peer proof v1\0"
_MAX_KEY_BYTES = 256  # a P-256 SubjectPublicKeyInfo is 91 bytes


def _signed_bytes(nonce: bytes, caller_id: str, server_id: str) -> bytes:
    return b"\0".join([_CONTEXT, nonce, caller_id.encode(), server_id.encode()])


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


class PeerProver:
    """The server's side: answers a call's nonce, if it carries one."""

    def __init__(self, identity: NodeIdentity) -> None:
        self._identity = identity
        self._public_der = identity.private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def answer(self, context: grpc.ServicerContext) -> None:
        """Sends the proof as the call's initial metadata (before any response)."""
        nonces = [v for k, v in context.invocation_metadata() if k == NONCE_KEY]
        if len(nonces) != 1 or not isinstance(nonces[0], bytes):
            return
        if len(nonces[0]) != NONCE_BYTES:
            return
        caller = peer_node_id(context)  # aborts a TLS caller whose certificate names no id
        if caller is None:
            return  # no TLS on this call: nothing to bind the proof to
        signature = self._identity.sign(_signed_bytes(nonces[0], caller, self._identity.node_id))
        context.send_initial_metadata(
            ((PUBLIC_KEY_KEY, self._public_der), (SIGNATURE_KEY, signature))
        )


def proof_problem(
    metadata: Sequence[tuple[str, str | bytes]] | None,
    nonce: bytes,
    caller_id: str,
    expected_id: str,
) -> str | None:
    """None when ``metadata`` (a call's initial metadata) proves that the server holds
    the key of ``expected_id`` and answered ``nonce`` sent by ``caller_id``; else why not."""
    values = dict(metadata or ())
    public_der, signature = values.get(PUBLIC_KEY_KEY), values.get(SIGNATURE_KEY)
    if not isinstance(public_der, bytes) or not isinstance(signature, bytes):
        return "it sent no proof of its node id"
    if len(public_der) > _MAX_KEY_BYTES:
        return "its proof carries an oversized key"
    try:
        public_key = serialization.load_der_public_key(public_der)
    except ValueError:
        return "its proof carries a key that cannot be parsed"
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return "its proof carries a key of a type members never use"
    proven = node_id_of(public_key)
    if proven != expected_id:
        return f"it proved to be node {proven}"
    try:
        public_key.verify(
            signature, _signed_bytes(nonce, caller_id, expected_id), ec.ECDSA(hashes.SHA256())
        )
    except InvalidSignature:
        return "its proof's signature does not cover this call"
    return None
