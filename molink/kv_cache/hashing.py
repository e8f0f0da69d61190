"""Chained block hashes for prefix caching.

A full block is identified by ``hash_block_tokens(parent_hash, token_ids)``, where
``parent_hash`` is the hash of the previous block of the same sequence (``ROOT_PARENT_HASH``
for the first block). The hash only locates a candidate: the cache also stores each block's
tokens and the identity of its parent and checks both on every hit, so a collision costs a
cache miss, never wrong KV.

Callers reach the function through this module (``hashing.hash_block_tokens``) so that
tests can replace it to force collisions.
"""

from __future__ import annotations

ROOT_PARENT_HASH = 0x6D6F6C696E6B  # any fixed int; the "parent" of a sequence's first block


def hash_block_tokens(parent_hash: int, token_ids: tuple[int, ...]) -> int:
    """Deterministic across processes: ints and tuples of ints hash without a random salt."""
    return hash((parent_hash, token_ids))
