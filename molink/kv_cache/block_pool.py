"""Physical blocks: reference counts, free lists and the prefix-cache index.

Every block is in exactly one of three states:

* referenced: ``ref_count > 0``, held by one or more block tables;
* free and uncached: in ``free_uncached``, holds nothing worth keeping;
* free and cached ("evictable"): in ``evictable``, holds the KV of a full block that is
  still in the prefix-cache index and can be hit again until its slot is needed.

Fresh blocks come from ``free_uncached`` first and only then from ``evictable`` in LRU
order, so cached content survives as long as possible.

Each cached block carries a ``serial`` that is unique for the lifetime of the pool. A
block's ``parent_serial`` names the exact cached content its KV was computed after, so a
hit is only accepted when the parent matched on the previous block is that very content:
equality of hashes is never trusted on its own.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import NamedTuple

from molink.kv_cache import hashing
from molink.kv_cache.errors import KVCacheError

logger = logging.getLogger(__name__)

ROOT_SERIAL = 0  # parent serial of a sequence's first block
UNCACHED_SERIAL = -1  # the block (and so every block after it) could not be cached


class ChainLink(NamedTuple):
    """A sequence's view of one of its full blocks in the prefix-cache chain."""

    block_hash: int
    serial: int  # serial of the cached block holding this exact content, or UNCACHED_SERIAL


ROOT_LINK = ChainLink(hashing.ROOT_PARENT_HASH, ROOT_SERIAL)


@dataclass(frozen=True, slots=True)
class CachedBlockInfo:
    block_hash: int
    parent_hash: int
    parent_serial: int
    serial: int
    token_ids: tuple[int, ...]


class BlockPool:
    def __init__(self, num_blocks: int) -> None:
        self.num_blocks = num_blocks
        self.ref_counts: list[int] = [0] * num_blocks
        self.cache_info: list[CachedBlockInfo | None] = [None] * num_blocks
        self.free_uncached: deque[int] = deque(range(num_blocks))
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.hash_to_block: dict[int, int] = {}
        self._next_serial = ROOT_SERIAL + 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_uncached) + len(self.evictable)

    def take_fresh(self, count: int) -> list[int]:
        """``count`` blocks with ref count 1; the caller has checked there are enough."""
        if count > self.num_free_blocks:
            raise KVCacheError(f"asked for {count} blocks, {self.num_free_blocks} free")
        taken = []
        for _ in range(count):
            if self.free_uncached:
                block_id = self.free_uncached.popleft()
            else:
                block_id, _ = self.evictable.popitem(last=False)
                self._drop_from_index(block_id)
            self.ref_counts[block_id] = 1
            taken.append(block_id)
        return taken

    def touch(self, block_id: int) -> None:
        """Share an already cached block (a prefix-cache hit)."""
        if self.ref_counts[block_id] == 0:
            del self.evictable[block_id]
        self.ref_counts[block_id] += 1

    def release(self, block_id: int) -> None:
        count = self.ref_counts[block_id]
        if count <= 0:
            raise KVCacheError(f"block {block_id} released more often than taken")
        self.ref_counts[block_id] = count - 1
        if count > 1:
            return
        if self.cache_info[block_id] is not None:
            self.evictable[block_id] = None  # most recently used end
        else:
            self.free_uncached.append(block_id)

    def lookup(self, block_hash: int, token_ids: tuple[int, ...], parent_serial: int) -> int | None:
        """The cached block with exactly this content after exactly this parent, if any."""
        block_id = self.hash_to_block.get(block_hash)
        if block_id is None:
            return None
        info = self.cache_info[block_id]
        assert info is not None
        if info.token_ids != token_ids or info.parent_serial != parent_serial:
            logger.debug("prefix-cache hash %x matched different content; miss", block_hash)
            return None
        return block_id

    def register(self, block_id: int, parent: ChainLink, token_ids: tuple[int, ...]) -> ChainLink:
        """Enter a freshly computed full block in the index; returns the sequence's link.

        When identical content is already cached, that block stays the cached one and the
        link names it. A colliding entry that no table holds is replaced; one in use wins
        and this block stays uncached.
        """
        block_hash = hashing.hash_block_tokens(parent.block_hash, token_ids)
        existing = self.hash_to_block.get(block_hash)
        if existing is not None:
            info = self.cache_info[existing]
            assert info is not None
            if info.token_ids == token_ids and info.parent_serial == parent.serial:
                return ChainLink(block_hash, info.serial)
            if self.ref_counts[existing] > 0:
                self._log_in_use_clash(info, parent, token_ids)
                return ChainLink(block_hash, UNCACHED_SERIAL)
            self.uncache(existing)
        if self.cache_info[block_id] is not None:
            raise KVCacheError(f"block {block_id} is already cached")
        serial = self._next_serial
        self._next_serial += 1
        self.cache_info[block_id] = CachedBlockInfo(
            block_hash, parent.block_hash, parent.serial, serial, token_ids
        )
        self.hash_to_block[block_hash] = block_id
        return ChainLink(block_hash, serial)

    @staticmethod
    def _log_in_use_clash(
        info: CachedBlockInfo, parent: ChainLink, token_ids: tuple[int, ...]
    ) -> None:
        """Equal tokens after an equal parent hash are the same content cached after
        another copy of its parent (serials tell copies apart): expected, not a collision."""
        if info.token_ids == token_ids and info.parent_hash == parent.block_hash:
            logger.debug(
                "prefix-cache block %x is cached after another copy of its parent; "
                "this copy stays uncached",
                info.block_hash,
            )
            return
        logger.warning("prefix-cache hash collision on %x; block left uncached", info.block_hash)

    def uncache(self, block_id: int) -> None:
        """Forget a block's cached content; a free cached block becomes free uncached."""
        self._drop_from_index(block_id)
        if self.ref_counts[block_id] == 0 and block_id in self.evictable:
            del self.evictable[block_id]
            self.free_uncached.append(block_id)

    def uncache_all(self) -> None:
        for block_id in list(self.hash_to_block.values()):
            self.uncache(block_id)

    def _drop_from_index(self, block_id: int) -> None:
        info = self.cache_info[block_id]
        if info is None:
            return
        self.cache_info[block_id] = None
        if self.hash_to_block.get(info.block_hash) == block_id:
            del self.hash_to_block[info.block_hash]
