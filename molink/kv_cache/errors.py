"""Errors of the KV-cache bookkeeping."""

from __future__ import annotations

from molink.errors import MolinkError


class KVCacheError(MolinkError):
    """The KV-cache manager was used wrongly (unknown sequence, stale prefix hit, ...)."""


class KVCacheIntegrityError(KVCacheError):
    """An invariant of the block bookkeeping does not hold; the message says which."""
