"""gRPC credentials of a swarm member, and the caller's identity as a servicer sees it.

gRPC's own TLS does the cryptography: servers require a client certificate, both ends
trust only the swarm authority, and the host name check is pinned to the one name every
member certificate carries (peers sit behind arbitrary addresses).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc
from cryptography import x509

from molink.security.authority import TLS_SERVER_NAME, SwarmAuthority
from molink.security.identity import NodeIdentity, node_id_of_certificate
from molink.security.swarm_key import SwarmKey


@dataclass(frozen=True, repr=False)
class SwarmCredentials:
    """What one member needs to serve and to call other members."""

    authority: SwarmAuthority
    identity: NodeIdentity

    @classmethod
    def from_key(cls, key: SwarmKey, identity: NodeIdentity | None = None) -> SwarmCredentials:
        authority = SwarmAuthority.from_key(key)
        return cls(authority, identity or NodeIdentity.generate(authority))

    def __post_init__(self) -> None:
        certificate = self.identity.certificate
        if certificate is None or not self.authority.is_member(certificate):
            raise ValueError(
                f"node {self.identity.node_id} has no certificate of {self.authority.name}"
            )

    def __repr__(self) -> str:
        return f"SwarmCredentials({self.identity.node_id} in {self.authority.name})"

    @property
    def node_id(self) -> str:
        return self.identity.node_id

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.identity.private_key_pem(), self.identity.certificate_pem())],
            root_certificates=self.authority.certificate_pem(),
            require_client_auth=True,
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.authority.certificate_pem(),
            private_key=self.identity.private_key_pem(),
            certificate_chain=self.identity.certificate_pem(),
        )

    @staticmethod
    def channel_options() -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", TLS_SERVER_NAME)]


def peer_node_id(context: grpc.ServicerContext) -> str | None:
    """The id of the member on the other end of this call, from the certificate it proved
    in the TLS handshake; None on an unauthenticated (open mode) connection.

    A TLS caller whose certificate names no node id (any member can issue one over a key
    of another type) is not an open-mode caller: the call ends here with UNAUTHENTICATED
    (``abort`` raises), since None would let it act for any head."""
    auth = context.auth_context()
    if auth.get("transport_security_type") != [b"ssl"]:
        return None
    certificates = auth.get("x509_pem_cert") or []
    node_id = _node_id_of_pem(certificates[0]) if len(certificates) == 1 else None
    if node_id is None:
        context.abort(
            grpc.StatusCode.UNAUTHENTICATED,
            "the caller's certificate names no node id (members use P-256 keys)",
        )
    return node_id


@functools.lru_cache(maxsize=1024)
def _node_id_of_pem(pem: bytes) -> str | None:
    # Parsed once per distinct certificate: long-lived streams and repeated unary calls
    # from the same peer present the same one.
    try:
        return node_id_of_certificate(x509.load_pem_x509_certificate(pem))
    except ValueError:
        return None
