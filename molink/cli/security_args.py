"""Flags for swarm membership (--molink-swarm-key) and HTTPS (--ssl-keyfile/--ssl-certfile).

The HTTPS flags are vLLM's; the swarm key comes from the flag, a file, or $MOLINK_SWARM_KEY.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Protocol

from molink.errors import InvalidParameterError
from molink.security.swarm_key import SWARM_KEY_ENV, SwarmKey, load_swarm_key


class SecurityArgs(Protocol):
    molink_enabled: bool
    molink_swarm_key: str | None
    molink_swarm_key_file: str | None
    ssl_keyfile: str | None
    ssl_certfile: str | None
    ssl_ca_certs: str | None
    ssl_cert_reqs: int
    molink_verify_fraction: float


def swarm_key_of(args: SecurityArgs) -> SwarmKey | None:
    """The swarm key of a pipeline node (None: open mode); the environment counts only for
    pipeline nodes, so a key exported for them does not disturb a single-node server."""
    if not args.molink_enabled:
        return None
    return load_swarm_key(args.molink_swarm_key, args.molink_swarm_key_file)


def validate_security_args(args: SecurityArgs) -> None:
    if not args.molink_enabled:
        for name in ("molink_swarm_key", "molink_swarm_key_file"):
            if getattr(args, name) is not None:
                raise InvalidParameterError(name, "a swarm key needs --molink-enabled")
    swarm_key_of(args)  # raises, naming the flag, on a malformed key or an unreadable file
    fraction = args.molink_verify_fraction
    if not (isinstance(fraction, float | int) and 0.0 <= fraction <= 1.0):
        raise InvalidParameterError("molink_verify_fraction", f"{fraction} must be in [0, 1]")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        missing = "ssl_certfile" if args.ssl_certfile is None else "ssl_keyfile"
        raise InvalidParameterError(missing, "HTTPS needs both --ssl-keyfile and --ssl-certfile")
    for name in ("ssl_keyfile", "ssl_certfile", "ssl_ca_certs"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise InvalidParameterError(name, f"{path} is not a readable file")
    if args.ssl_cert_reqs not in (0, 1, 2):
        raise InvalidParameterError(
            "ssl_cert_reqs", f"{args.ssl_cert_reqs} must be 0 (none), 1 (optional) or 2 (required)"
        )
    if args.ssl_keyfile is None and (args.ssl_ca_certs is not None or args.ssl_cert_reqs):
        name = "ssl_ca_certs" if args.ssl_ca_certs is not None else "ssl_cert_reqs"
        raise InvalidParameterError(name, "client certificates need HTTPS (--ssl-keyfile)")
    if args.ssl_cert_reqs and args.ssl_ca_certs is None:
        raise InvalidParameterError(
            "ssl_cert_reqs", "checking client certificates needs --ssl-ca-certs"
        )


def add_swarm_key_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument(
        "--molink-swarm-key",
        default=None,
        metavar="KEY",
        help="the swarm's shared key (from `molink keygen`): only nodes holding it can join, "
        "and all traffic between them is mutual TLS (default: the file, else "
        f"${SWARM_KEY_ENV}, else open mode: plaintext, loopback only unless told otherwise)",
    )
    parser.add_argument(
        "--molink-swarm-key-file",
        default=None,
        metavar="PATH",
        help="read the swarm key from this file (default: none)",
    )


def add_security_args(parser: argparse.ArgumentParser) -> None:
    https = parser.add_argument_group("HTTPS")
    https.add_argument(
        "--ssl-keyfile",
        default=None,
        help="serve the API over HTTPS with this private key (default: plain HTTP)",
    )
    https.add_argument(
        "--ssl-certfile",
        default=None,
        help="the certificate (chain) for --ssl-keyfile (default: none)",
    )
    https.add_argument(
        "--ssl-ca-certs",
        default=None,
        help="CA certificates that sign the clients' certificates (default: none)",
    )
    https.add_argument(
        "--ssl-cert-reqs",
        type=int,
        default=0,
        help="client certificates: 0 not asked, 1 checked when shown, 2 required "
        "(default: %(default)s)",
    )
    group = parser.add_argument_group("MoLink swarm membership")
    add_swarm_key_args(group)
    group.add_argument(
        "--molink-verify-fraction",
        type=float,
        default=0.0,
        metavar="F",
        help="spot checks (head): this fraction of sequences, chosen at random (so this "
        "fraction of sequence-steps), also runs on other replicas of a span of its route; "
        "their hidden states and tokens are compared, and a checked sequence's tokens reach "
        "its user once verified (other steps are not held); a node outvoted by two replicas "
        "is banned from routes (default: %(default)s, no checks)",
    )
