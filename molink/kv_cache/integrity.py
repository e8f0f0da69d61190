"""Invariants of the block bookkeeping, checked on demand (tests call it after every step).

Costs O(blocks + table entries); meant for tests and debugging, not for every step.
"""

from __future__ import annotations

from collections import Counter

from molink.kv_cache import hashing
from molink.kv_cache.block_pool import BlockPool, ChainLink
from molink.kv_cache.errors import KVCacheIntegrityError


def check_pool_integrity(
    pool: BlockPool,
    tables: dict[int, list[int]],
    chains: dict[int, list[ChainLink]],
    block_size: int,
) -> None:
    _check_free_lists(pool)
    references = _count_references(pool, tables)
    _check_ref_counts(pool, references)
    _check_index(pool, block_size)
    _check_chains(pool, tables, chains)


def _fail(message: str) -> None:
    raise KVCacheIntegrityError(message)


def _check_free_lists(pool: BlockPool) -> None:
    uncached = set(pool.free_uncached)
    if len(uncached) != len(pool.free_uncached):
        _fail("a block appears twice in the free list")
    both = uncached.intersection(pool.evictable)
    if both:
        _fail(f"blocks {sorted(both)} are both free-uncached and evictable")
    for block_id in uncached:
        if pool.cache_info[block_id] is not None:
            _fail(f"free-uncached block {block_id} is still cached")
    for block_id in pool.evictable:
        if pool.cache_info[block_id] is None:
            _fail(f"evictable block {block_id} holds no cached content")
    if len(pool.ref_counts) != pool.num_blocks or len(pool.cache_info) != pool.num_blocks:
        _fail("per-block metadata does not cover every block")


def _count_references(pool: BlockPool, tables: dict[int, list[int]]) -> Counter[int]:
    references: Counter[int] = Counter()
    for seq_id, table in tables.items():
        if len(set(table)) != len(table):
            _fail(f"sequence {seq_id} holds a block twice: {table}")
        for block_id in table:
            if not 0 <= block_id < pool.num_blocks:
                _fail(f"sequence {seq_id} holds block {block_id} outside the pool")
        references.update(table)
    return references


def _check_ref_counts(pool: BlockPool, references: Counter[int]) -> None:
    num_referenced = 0
    for block_id, ref_count in enumerate(pool.ref_counts):
        if ref_count != references[block_id]:
            _fail(
                f"block {block_id} has ref count {ref_count} "
                f"but {references[block_id]} tables hold it"
            )
        is_free = block_id in pool.evictable or block_id in pool.free_uncached
        if ref_count > 0 and is_free:
            _fail(f"block {block_id} is both free and referenced")
        if ref_count == 0 and not is_free:
            _fail(f"block {block_id} is neither free nor referenced (leaked)")
        num_referenced += ref_count > 0
    if pool.num_free_blocks + num_referenced != pool.num_blocks:
        _fail(
            f"{pool.num_free_blocks} free + {num_referenced} referenced != {pool.num_blocks} blocks"
        )


def _check_index(pool: BlockPool, block_size: int) -> None:
    for block_hash, block_id in pool.hash_to_block.items():
        info = pool.cache_info[block_id]
        if info is None or info.block_hash != block_hash:
            _fail(f"index entry {block_hash:x} -> block {block_id} disagrees with the block")
        if len(info.token_ids) != block_size:
            _fail(f"cached block {block_id} holds {len(info.token_ids)} tokens, not {block_size}")
        if hashing.hash_block_tokens(info.parent_hash, info.token_ids) != block_hash:
            _fail(f"cached block {block_id}'s hash does not match its parent and tokens")
    num_cached = sum(info is not None for info in pool.cache_info)
    if num_cached != len(pool.hash_to_block):
        _fail(f"{num_cached} blocks claim to be cached, the index holds {len(pool.hash_to_block)}")
    serials = [info.serial for info in pool.cache_info if info is not None]
    if len(set(serials)) != len(serials):
        _fail("two cached blocks share a serial")


def _check_chains(
    pool: BlockPool, tables: dict[int, list[int]], chains: dict[int, list[ChainLink]]
) -> None:
    if tables.keys() != chains.keys():
        _fail("block tables and prefix chains cover different sequences")
    for seq_id, chain in chains.items():
        table = tables[seq_id]
        if len(chain) > len(table):
            _fail(f"sequence {seq_id} registered {len(chain)} blocks but holds {len(table)}")
        for block_id, link in zip(table, chain, strict=False):
            info = pool.cache_info[block_id]
            if info is not None and info.serial != link.serial:
                _fail(f"sequence {seq_id}'s link to cached block {block_id} is stale")
