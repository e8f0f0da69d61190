"""Paged KV-cache bookkeeping on the head: blocks, tables, prefix reuse, integrity checks."""

from molink.kv_cache.errors import KVCacheError, KVCacheIntegrityError
from molink.kv_cache.manager import NO_PREFIX_HIT, KVCacheManager, PrefixHit

__all__ = [
    "NO_PREFIX_HIT",
    "KVCacheError",
    "KVCacheIntegrityError",
    "KVCacheManager",
    "PrefixHit",
]
