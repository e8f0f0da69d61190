"""Paged KV-cache bookkeeping on the head: block tables, free blocks, prefix reuse.

The head owns the block ids; every stage mirrors the tables (see molink/step.py). This
module never touches tensors.

Typical use by the scheduler::

    hit = kv.find_cached_prefix(token_ids, max_num_tokens=len(token_ids) - 1)
    new_blocks = kv.allocate(seq_id, hit.num_tokens + chunk, hit)   # None: does not fit
    ...  # after the step has run on every stage
    kv.register_computed(seq_id, token_ids, num_computed_tokens)
    ...
    kv.free(seq_id)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from molink.kv_cache import hashing
from molink.kv_cache.block_pool import (
    ROOT_LINK,
    UNCACHED_SERIAL,
    BlockPool,
    ChainLink,
)
from molink.kv_cache.errors import KVCacheError, KVCacheIntegrityError
from molink.kv_cache.integrity import check_pool_integrity

_UNCACHED_LINK = ChainLink(0, UNCACHED_SERIAL)


@dataclass(frozen=True)
class PrefixHit:
    """Cached full blocks that hold a prefix of some token ids; pass it to ``allocate``."""

    block_ids: tuple[int, ...] = ()
    links: tuple[ChainLink, ...] = ()
    num_tokens: int = 0


NO_PREFIX_HIT = PrefixHit()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise KVCacheError(f"num_blocks must be >= 1, got {num_blocks}")
        if block_size < 1:
            raise KVCacheError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._pool = BlockPool(num_blocks)
        self._tables: dict[int, list[int]] = {}
        self._chains: dict[int, list[ChainLink]] = {}  # links of the registered full blocks

    # -- accounting ----------------------------------------------------------------------

    @property
    def num_total_blocks(self) -> int:
        return self._pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Blocks a new allocation can take, cached-but-unreferenced ones included."""
        return self._pool.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self._pool.hash_to_block)

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_total_blocks

    @property
    def num_sequences(self) -> int:
        return len(self._tables)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def has_sequence(self, seq_id: int) -> bool:
        return seq_id in self._tables

    def block_table(self, seq_id: int) -> Sequence[int]:
        """The sequence's table (read-only view; empty for a sequence with no blocks)."""
        return self._tables.get(seq_id, ())

    # -- prefix caching ------------------------------------------------------------------

    def find_cached_prefix(
        self, token_ids: Sequence[int], max_num_tokens: int | None = None
    ) -> PrefixHit:
        """The longest run of cached full blocks holding a prefix of ``token_ids``.

        Only the first ``max_num_tokens`` tokens are considered (the scheduler passes
        ``len - 1`` so the last token is always recomputed and yields logits).
        """
        if not self.enable_prefix_caching:
            return NO_PREFIX_HIT
        limit = len(token_ids) if max_num_tokens is None else min(len(token_ids), max_num_tokens)
        block_ids: list[int] = []
        links: list[ChainLink] = []
        parent = ROOT_LINK
        for start in range(0, limit - self.block_size + 1, self.block_size):
            tokens = tuple(token_ids[start : start + self.block_size])
            block_hash = hashing.hash_block_tokens(parent.block_hash, tokens)
            block_id = self._pool.lookup(block_hash, tokens, parent.serial)
            if block_id is None:
                break
            info = self._pool.cache_info[block_id]
            assert info is not None
            parent = ChainLink(block_hash, info.serial)
            block_ids.append(block_id)
            links.append(parent)
        return PrefixHit(tuple(block_ids), tuple(links), len(block_ids) * self.block_size)

    def register_computed(
        self, seq_id: int, token_ids: Sequence[int], num_computed_tokens: int
    ) -> None:
        """Enter the sequence's newly computed full blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        table = self._require_table(seq_id)
        chain = self._chains[seq_id]
        num_full = min(num_computed_tokens // self.block_size, len(table))
        for index in range(len(chain), num_full):
            parent = chain[index - 1] if index else ROOT_LINK
            if parent.serial == UNCACHED_SERIAL:
                chain.append(_UNCACHED_LINK)
                continue
            start = index * self.block_size
            tokens = tuple(token_ids[start : start + self.block_size])
            chain.append(self._pool.register(table[index], parent, tokens))

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (the stages' KV can no longer be trusted to exist)."""
        self._pool.uncache_all()
        for seq_id, chain in self._chains.items():
            self._chains[seq_id] = [_UNCACHED_LINK] * len(chain)

    # -- allocation ----------------------------------------------------------------------

    def allocate(
        self, seq_id: int, num_tokens: int, prefix_hit: PrefixHit = NO_PREFIX_HIT
    ) -> list[int] | None:
        """Grow the sequence's table to hold ``num_tokens`` tokens.

        ``prefix_hit`` (from ``find_cached_prefix``, with no allocation in between) is only
        allowed on a sequence's first allocation; its blocks start the table. Returns the
        block ids appended (hit blocks included), or None, changing nothing, when there are
        not enough free blocks.
        """
        table = self._tables.get(seq_id)
        if table is None:
            return self._allocate_first(seq_id, num_tokens, prefix_hit)
        if prefix_hit.block_ids:
            raise KVCacheError(f"sequence {seq_id} already has blocks; no prefix hit allowed")
        num_fresh = self.num_blocks_for(num_tokens) - len(table)
        if num_fresh <= 0:
            return []
        if num_fresh > self._pool.num_free_blocks:
            return None
        appended = self._pool.take_fresh(num_fresh)
        table.extend(appended)
        return appended

    def _allocate_first(
        self, seq_id: int, num_tokens: int, prefix_hit: PrefixHit
    ) -> list[int] | None:
        self._check_hit_is_current(prefix_hit)
        num_fresh = max(0, self.num_blocks_for(num_tokens) - len(prefix_hit.block_ids))
        # Hit blocks that nobody holds count as free now and stop being free once shared.
        num_hit_free = sum(1 for b in prefix_hit.block_ids if self._pool.ref_counts[b] == 0)
        if num_fresh > self.num_free_blocks - num_hit_free:
            return None
        for block_id in prefix_hit.block_ids:
            self._pool.touch(block_id)
        appended = list(prefix_hit.block_ids) + self._pool.take_fresh(num_fresh)
        self._tables[seq_id] = list(appended)
        self._chains[seq_id] = list(prefix_hit.links)
        return appended

    def free(self, seq_id: int) -> None:
        """Drop the sequence's table; a no-op for a sequence that holds no blocks.

        Blocks are released tail first, so a sequence's last blocks (the least likely to
        be shared) are the first cached ones to be evicted.
        """
        table = self._tables.pop(seq_id, None)
        self._chains.pop(seq_id, None)
        for block_id in reversed(table or ()):
            self._pool.release(block_id)

    def check_integrity(self) -> None:
        """Raise KVCacheIntegrityError when any bookkeeping invariant is broken."""
        check_pool_integrity(self._pool, self._tables, self._chains, self.block_size)
        if not self.enable_prefix_caching and self._pool.hash_to_block:
            raise KVCacheIntegrityError("blocks are cached although prefix caching is off")

    # -- helpers -------------------------------------------------------------------------

    def _require_table(self, seq_id: int) -> list[int]:
        table = self._tables.get(seq_id)
        if table is None:
            raise KVCacheError(f"sequence {seq_id} holds no blocks")
        return table

    def _check_hit_is_current(self, prefix_hit: PrefixHit) -> None:
        for block_id, link in zip(prefix_hit.block_ids, prefix_hit.links, strict=True):
            info = self._pool.cache_info[block_id]
            if info is None or info.serial != link.serial:
                raise KVCacheError(f"prefix hit on block {block_id} is stale; look it up again")
