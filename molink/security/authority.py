"""The swarm's certificate authority, derived from the swarm key alone.

Every member computes the same authority (key and certificate, byte for byte), so nothing
has to be copied between machines but the key itself. P-256 ECDSA rather than Ed25519:
gRPC's TLS (BoringSSL) does not offer Ed25519 signatures in its handshake. The
authority's certificate is signed with deterministic ECDSA (RFC 6979) and fixed fields so
that it is identical everywhere.
"""

from __future__ import annotations

import datetime
import hashlib
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from molink.security.swarm_key import SwarmKey

# The name every member's certificate carries and every channel expects: members are
# reached at arbitrary addresses (NAT, proxies), so the TLS host name check is pinned to
# this name and identity comes from the certificate's key instead (molink.security).
TLS_SERVER_NAME = "molink-swarm"

_SALT = b"molink swarm authority v1"
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
_EPOCH_START = datetime.datetime(2000, 1, 1, tzinfo=datetime.timezone.utc)
_EPOCH_END = datetime.datetime(9999, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
_MEMBER_CERT_LIFETIME = datetime.timedelta(days=3650)
_CLOCK_SKEW = datetime.timedelta(hours=1)


def _derive(key: SwarmKey, purpose: bytes, length: int) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=purpose).derive(
        key.secret
    )


def _derive_private_key(key: SwarmKey) -> ec.EllipticCurvePrivateKey:
    # 64 extra bits before the reduction make the scalar's bias negligible (FIPS 186-5 A.4.1).
    material = int.from_bytes(_derive(key, b"ca private key", 40), "big")
    return ec.derive_private_key(material % (_P256_ORDER - 1) + 1, ec.SECP256R1())


@dataclass(frozen=True, repr=False)
class SwarmAuthority:
    private_key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate
    # Secrets for what members publish outside gRPC (the DHT, molink.security.sealing):
    # an AES-256-GCM key and the name under which the swarm's records are kept.
    sealing_key: bytes = field(default=b"", repr=False)
    namespace: str = ""

    @classmethod
    def from_key(cls, key: SwarmKey) -> SwarmAuthority:
        private_key = _derive_private_key(key)
        public_der = private_key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        name = x509.Name(
            [
                x509.NameAttribute(
                    NameOID.COMMON_NAME,
                    f"molink swarm {hashlib.sha256(public_der).hexdigest()[:16]}",
                )
            ]
        )
        serial = int.from_bytes(_derive(key, b"ca serial", 16), "big") >> 1 or 1
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(private_key.public_key())
            .serial_number(serial)
            .not_valid_before(_EPOCH_START)
            .not_valid_after(_EPOCH_END)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(cert_sign=True), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(private_key.public_key()),
                critical=False,
            )
            .sign(private_key, hashes.SHA256(), ecdsa_deterministic=True)
        )
        sealing_key = _derive(key, b"dht record sealing key", 32)
        namespace = _derive(key, b"dht namespace", 16).hex()
        return cls(private_key, certificate, sealing_key, namespace)

    def __repr__(self) -> str:
        return f"SwarmAuthority({self.name})"

    @property
    def name(self) -> str:
        return self.certificate.subject.rfc4514_string()

    def certificate_pem(self) -> bytes:
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    def issue(self, public_key: ec.EllipticCurvePublicKey, node_id: str) -> x509.Certificate:
        """A member certificate for ``public_key``, usable as TLS server and client."""
        now = datetime.datetime.now(datetime.timezone.utc)
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + _MEMBER_CERT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(cert_sign=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(TLS_SERVER_NAME)]), critical=False
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.private_key.public_key()),
                critical=False,
            )
            .sign(self.private_key, hashes.SHA256())
        )

    def is_member(self, certificate: x509.Certificate) -> bool:
        """Issued by this authority and within its validity (for certificates that arrive
        outside TLS, e.g. inside a signed record)."""
        try:
            certificate.verify_directly_issued_by(self.certificate)
        except (ValueError, TypeError, InvalidSignature):
            return False
        now = datetime.datetime.now(datetime.timezone.utc)
        return certificate.not_valid_before_utc <= now <= certificate.not_valid_after_utc


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )
