"""The swarm key: a 256-bit secret shared by every member, as printable text.

Only generated keys are accepted (``molink keygen``): a passphrase a person makes up is
too easy to guess, and everything else (the authority, membership) derives from the key.
"""

from __future__ import annotations

import base64
import binascii
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from molink.errors import InvalidParameterError

SWARM_KEY_ENV = "MOLINK_SWARM_KEY"
_PREFIX = "molink-swarm-v1:"
_KEY_BYTES = 32


@dataclass(frozen=True, repr=False)
class SwarmKey:
    secret: bytes

    def __post_init__(self) -> None:
        if len(self.secret) != _KEY_BYTES:
            raise InvalidParameterError(
                "molink_swarm_key", f"must hold {_KEY_BYTES} bytes, got {len(self.secret)}"
            )

    def __repr__(self) -> str:  # never print the secret in a log or a traceback
        return "SwarmKey(<secret>)"

    def text(self) -> str:
        return _PREFIX + base64.urlsafe_b64encode(self.secret).decode().rstrip("=")

    @classmethod
    def parse(cls, text: str, field: str = "molink_swarm_key") -> SwarmKey:
        text = text.strip()
        if not text.startswith(_PREFIX):
            raise InvalidParameterError(
                field,
                f"is not a swarm key (those start with {_PREFIX!r}); create one with `molink keygen`",
            )
        body = text[len(_PREFIX) :]
        try:
            secret = base64.b64decode(body + "=" * (-len(body) % 4), altchars=b"-_", validate=True)
        except (binascii.Error, ValueError):
            raise InvalidParameterError(field, "is not valid base64url after the prefix") from None
        if len(secret) != _KEY_BYTES:
            raise InvalidParameterError(
                field,
                f"must encode {_KEY_BYTES} bytes, got {len(secret)}; create one with `molink keygen`",
            )
        return cls(secret)


def generate_swarm_key() -> SwarmKey:
    return SwarmKey(secrets.token_bytes(_KEY_BYTES))


def load_swarm_key(
    key: str | None, key_file: str | None, environ: dict[str, str] | None = None
) -> SwarmKey | None:
    """The key from the flag, else from the file, else from $MOLINK_SWARM_KEY; None: open
    mode. Both flags at once is an error rather than a silent choice."""
    if key is not None and key_file is not None:
        raise InvalidParameterError(
            "molink_swarm_key_file", "give either --molink-swarm-key or --molink-swarm-key-file"
        )
    if key is not None:
        return SwarmKey.parse(key)
    if key_file is not None:
        try:
            text = Path(key_file).read_text()
        except OSError as exc:
            raise InvalidParameterError(
                "molink_swarm_key_file", f"cannot read {key_file}: {exc.strerror}"
            ) from None
        return SwarmKey.parse(text, "molink_swarm_key_file")
    text = (os.environ if environ is None else environ).get(SWARM_KEY_ENV)
    return SwarmKey.parse(text, SWARM_KEY_ENV) if text else None
