"""A pipeline node's security at start: its credentials, and where its gRPC port binds."""

from __future__ import annotations

import ipaddress
import logging

from molink.security.credentials import SwarmCredentials
from molink.security.swarm_key import SwarmKey

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def node_credentials(key: SwarmKey | None) -> SwarmCredentials | None:
    """A fresh identity and member certificate; None (open mode) without a key."""
    if key is None:
        return None
    credentials = SwarmCredentials.from_key(key)
    logger.info(
        "swarm member %s of %s: gRPC is mutual TLS, only members are served",
        credentials.node_id,
        credentials.authority.name,
    )
    return credentials


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def grpc_bind_host(requested: str, advertised: str, secure: bool) -> str:
    """Where the gRPC server listens.

    A member of a swarm binds what it was asked. In open mode a node whose advertised
    address is on loopback binds loopback only: nothing outside this machine needs it, and
    nothing outside can then reach it. An open node advertised on another address must be
    reachable there (the two-machine commands of the README rely on it), so it binds as
    asked and says what that exposes.
    """
    if secure:
        return requested
    if is_loopback(advertised):
        if advertised == "localhost":
            return LOOPBACK
        host = advertised.strip("[]")
        return f"[{host}]" if ":" in host else host
    if not is_loopback(requested):
        logger.warning(
            "open mode: the gRPC port listens on %s (advertised as %s) without a swarm key. "
            "Anyone who can reach it can join the pipeline, read the activations of every "
            "prompt, return forged tokens and release other users' sequences. Use it only on "
            "a network you trust, or give every node the same --molink-swarm-key "
            "(create one with `molink keygen`).",
            requested,
            advertised,
        )
    return requested
