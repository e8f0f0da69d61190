"""A node's identity: a key pair made at start, and its id, a hash of the public key.

The id is what peers, records and authorization name a node by. It is bound to the key,
not to a name in a certificate: any swarm member can issue certificates, but only the
holder of the private key can complete a TLS handshake (or sign a record) with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from molink.security.authority import SwarmAuthority

_ID_HEX_CHARS = 32  # 128 bits of SHA-256: no second preimage within reach
_SIGNATURE = ec.ECDSA(hashes.SHA256())


def node_id_of(public_key: ec.EllipticCurvePublicKey) -> str:
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).hexdigest()[:_ID_HEX_CHARS]


def node_id_of_certificate(certificate: x509.Certificate) -> str | None:
    """The id of the key a certificate carries; None for a key type members never use."""
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return None
    return node_id_of(public_key)


def verify_signature(certificate: x509.Certificate, data: bytes, signature: bytes) -> bool:
    public_key = certificate.public_key()
    if not isinstance(public_key, ec.EllipticCurvePublicKey):
        return False
    try:
        public_key.verify(signature, data, _SIGNATURE)
    except InvalidSignature:
        return False
    return True


@dataclass(frozen=True, repr=False)
class NodeIdentity:
    """A node's key pair, id, and (in a swarm) its member certificate."""

    private_key: ec.EllipticCurvePrivateKey
    node_id: str
    certificate: x509.Certificate | None = None

    @classmethod
    def generate(cls, authority: SwarmAuthority | None = None) -> NodeIdentity:
        private_key = ec.generate_private_key(ec.SECP256R1())
        node_id = node_id_of(private_key.public_key())
        certificate = None
        if authority is not None:
            certificate = authority.issue(private_key.public_key(), node_id)
        return cls(private_key, node_id, certificate)

    def __repr__(self) -> str:
        return f"NodeIdentity({self.node_id})"

    def sign(self, data: bytes) -> bytes:
        return self.private_key.sign(data, _SIGNATURE)

    def private_key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def certificate_pem(self) -> bytes:
        if self.certificate is None:
            raise ValueError(f"node {self.node_id} has no member certificate (open mode)")
        return self.certificate.public_bytes(serialization.Encoding.PEM)
