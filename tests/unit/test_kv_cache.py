"""KVCacheManager: accounting, prefix caching, eviction, collisions, integrity checks."""

from __future__ import annotations

import logging

import pytest

from molink.kv_cache import hashing
from molink.kv_cache.block_pool import UNCACHED_SERIAL, BlockPool, ChainLink
from molink.kv_cache.errors import KVCacheError, KVCacheIntegrityError
from molink.kv_cache.manager import KVCacheManager

BS = 4


def tokens(n: int, start: int = 100) -> list[int]:
    return list(range(start, start + n))


def computed(kv: KVCacheManager, seq_id: int, token_ids: list[int], hit=None) -> list[int]:
    """Allocate for the whole sequence and register it as computed."""
    hit = hit if hit is not None else kv.find_cached_prefix(token_ids, len(token_ids) - 1)
    blocks = kv.allocate(seq_id, len(token_ids), hit)
    assert blocks is not None
    kv.register_computed(seq_id, token_ids, len(token_ids))
    kv.check_integrity()
    return list(kv.block_table(seq_id))


def test_allocate_grow_and_free_account_for_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    assert kv.allocate(1, 5) == [0, 1]
    kv.check_integrity()
    assert kv.allocate(1, 8) == []  # still fits in two blocks
    assert kv.allocate(1, 9) == [2]
    assert kv.allocate(2, 16) == [3, 4, 5, 6]
    kv.check_integrity()
    assert kv.num_free_blocks == 1
    assert kv.usage == pytest.approx(7 / 8)
    kv.free(1)
    kv.check_integrity()
    assert kv.num_free_blocks == 4
    assert kv.block_table(1) == ()
    kv.free(2)
    kv.free(2)  # idempotent
    kv.check_integrity()
    assert kv.num_free_blocks == 8


def test_allocate_that_does_not_fit_changes_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    kv.allocate(1, 8)
    assert kv.allocate(2, 12) is None
    assert not kv.has_sequence(2)
    assert kv.allocate(1, 17) is None
    assert list(kv.block_table(1)) == [0, 1]
    assert kv.num_free_blocks == 2
    kv.check_integrity()


def test_prefix_hit_shares_blocks_and_keeps_them_until_last_holder_frees():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = tokens(13)  # 3 full blocks + 1 token
    table_a = computed(kv, 1, prompt)
    hit = kv.find_cached_prefix(prompt)
    assert hit.block_ids == tuple(table_a[:3]) and hit.num_tokens == 12
    assert kv.allocate(2, 13, hit) == table_a[:3] + [4]
    kv.check_integrity()
    kv.free(1)
    kv.check_integrity()
    assert kv.find_cached_prefix(prompt).block_ids == tuple(table_a[:3])
    kv.free(2)
    kv.check_integrity()
    assert kv.num_free_blocks == 16
    # Freed but cached: still a hit until the slots are needed.
    assert kv.find_cached_prefix(prompt).num_tokens == 12


def test_hit_is_capped_by_max_num_tokens_to_full_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = tokens(12)
    computed(kv, 1, prompt)
    assert kv.find_cached_prefix(prompt).num_tokens == 12
    assert kv.find_cached_prefix(prompt, max_num_tokens=11).num_tokens == 8
    assert kv.find_cached_prefix(prompt[:7]).num_tokens == 4
    assert kv.find_cached_prefix(tokens(12, start=5)).num_tokens == 0


def test_only_full_computed_blocks_are_registered():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = tokens(10)
    kv.allocate(1, 10)
    kv.register_computed(1, prompt, 6)  # one full block computed
    kv.check_integrity()
    assert kv.num_cached_blocks == 1
    assert kv.find_cached_prefix(prompt).num_tokens == 4
    kv.register_computed(1, prompt, 10)
    assert kv.num_cached_blocks == 2


def test_evictable_blocks_count_as_free_and_are_evicted_lru_after_uncached_ones():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    first, second = tokens(8, 100), tokens(8, 200)
    computed(kv, 1, first)  # blocks 0, 1
    computed(kv, 2, second)  # blocks 2, 3
    kv.free(1)
    kv.free(2)
    assert kv.num_free_blocks == 6 and kv.num_cached_blocks == 4
    assert kv.allocate(3, 8) == [4, 5]  # never-cached blocks go first
    kv.check_integrity()
    assert kv.num_cached_blocks == 4
    assert kv.allocate(4, 4) == [1]  # LRU: first's tail was released first
    kv.check_integrity()
    assert kv.find_cached_prefix(first).num_tokens == 4
    assert kv.find_cached_prefix(second).num_tokens == 8


def test_hit_on_evictable_blocks_leaves_them_out_of_the_free_count():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    prompt = tokens(8)
    computed(kv, 1, prompt)
    kv.free(1)
    hit = kv.find_cached_prefix(prompt)
    assert hit.num_tokens == 8
    assert kv.allocate(2, 8 + 3 * BS, hit) is None  # 2 shared + 3 fresh > 4 blocks
    kv.check_integrity()
    assert kv.num_free_blocks == 4 and kv.find_cached_prefix(prompt).num_tokens == 8
    assert kv.allocate(2, 8 + 2 * BS, hit) is not None
    kv.check_integrity()
    assert kv.num_free_blocks == 0


def test_stale_prefix_hit_is_refused():
    kv = KVCacheManager(num_blocks=2, block_size=BS)
    prompt = tokens(8)
    computed(kv, 1, prompt)
    kv.free(1)
    hit = kv.find_cached_prefix(prompt)
    kv.allocate(2, 8)  # evicts both cached blocks
    kv.free(2)
    with pytest.raises(KVCacheError, match="stale"):
        kv.allocate(3, 8, hit)
    kv.check_integrity()


def test_prefix_hit_only_on_first_allocation():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = tokens(8)
    computed(kv, 1, prompt)
    kv.allocate(2, 1)
    with pytest.raises(KVCacheError):
        kv.allocate(2, 8, kv.find_cached_prefix(prompt))


def test_collision_with_different_tokens_is_a_miss(monkeypatch):
    monkeypatch.setattr(hashing, "hash_block_tokens", lambda parent, toks: 42)
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    computed(kv, 1, tokens(4, 100))
    assert kv.find_cached_prefix(tokens(4, 100)).num_tokens == 4
    assert kv.find_cached_prefix(tokens(4, 500)).num_tokens == 0


def test_collision_with_same_tokens_after_different_parent_is_a_miss(monkeypatch):
    # The hash ignores the parent, so block 1 of both prompts collides with equal tokens.
    monkeypatch.setattr(hashing, "hash_block_tokens", lambda parent, toks: hash(toks))
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    shared_tail = [7, 7, 7, 7]
    first = [1, 1, 1, 1] + shared_tail
    other = [9, 9, 9, 9] + shared_tail
    first_table = computed(kv, 1, first)
    # While first holds its tail block, other's tail cannot be cached and must not hit it.
    other_table = computed(kv, 2, other)
    assert kv.find_cached_prefix(other).block_ids == (other_table[0],)
    kv.free(1)
    kv.free(2)
    kv.check_integrity()
    # Once free, other's tail replaces first's entry; first must not hit other's tail.
    computed(kv, 3, other, hit=kv.find_cached_prefix(other, max_num_tokens=4))
    kv.free(3)
    assert kv.find_cached_prefix(other).num_tokens == 8
    assert kv.find_cached_prefix(first).block_ids == (first_table[0],)
    kv.check_integrity()


def test_collision_while_the_cached_block_is_in_use_leaves_the_new_block_uncached(monkeypatch):
    monkeypatch.setattr(hashing, "hash_block_tokens", lambda parent, toks: 42)
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    computed(kv, 1, tokens(4, 100))
    computed(kv, 2, tokens(4, 200))
    assert kv.num_cached_blocks == 1
    assert kv.find_cached_prefix(tokens(4, 200)).num_tokens == 0
    kv.free(1)
    kv.free(2)
    kv.check_integrity()


def test_concurrent_duplicates_stay_private_and_diverging_children_still_hit():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    prefix = tokens(4)
    a = prefix + [1, 2, 3, 4]
    b = prefix + [5, 6, 7, 8]
    kv.allocate(1, 8)
    kv.allocate(2, 8)  # neither sees a hit: nothing is computed yet
    kv.register_computed(1, a, 8)
    kv.register_computed(2, b, 8)
    kv.check_integrity()
    assert kv.num_cached_blocks == 3  # b's copy of the prefix is a duplicate
    hit_b = kv.find_cached_prefix(b)
    assert hit_b.block_ids == (kv.block_table(1)[0], kv.block_table(2)[1])
    kv.free(1)
    kv.free(2)
    kv.check_integrity()
    assert kv.num_free_blocks == 16


def test_prefix_caching_disabled_never_hits_or_caches():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    prompt = tokens(8)
    computed(kv, 1, prompt)
    assert kv.num_cached_blocks == 0
    assert kv.find_cached_prefix(prompt).num_tokens == 0
    kv.free(1)
    kv.check_integrity()


def test_reset_prefix_cache_forgets_every_block():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    prompt = tokens(9)
    computed(kv, 1, prompt)
    computed(kv, 2, tokens(8, 300))
    kv.free(2)
    kv.reset_prefix_cache()
    kv.check_integrity()
    assert kv.num_cached_blocks == 0
    assert kv.find_cached_prefix(prompt).num_tokens == 0
    kv.allocate(1, 13)
    kv.register_computed(1, prompt + [1, 2, 3, 4], 13)  # nothing after a reset is cached
    assert kv.num_cached_blocks == 0
    kv.free(1)
    kv.check_integrity()
    assert kv.num_free_blocks == 8


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda kv: kv._pool.ref_counts.__setitem__(0, 2),
        lambda kv: kv._pool.free_uncached.append(0),
        lambda kv: kv._pool.free_uncached.popleft(),
        lambda kv: kv._tables[1].append(kv._tables[1][0]),
        lambda kv: kv._pool.hash_to_block.__setitem__(123, 5),
        lambda kv: kv._pool.hash_to_block.pop(next(iter(kv._pool.hash_to_block))),
        lambda kv: kv._chains[1].reverse(),
    ],
)
def test_check_integrity_detects_corruption(corrupt):
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    computed(kv, 1, tokens(9))
    corrupt(kv)
    with pytest.raises(KVCacheIntegrityError):
        kv.check_integrity()


def test_cached_content_change_is_detected():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    computed(kv, 1, tokens(8))
    block_id = kv.block_table(1)[1]
    info = kv._pool.cache_info[block_id]
    kv._pool.cache_info[block_id] = type(info)(
        info.block_hash, info.parent_hash, info.parent_serial, info.serial, (0, 0, 0, 0)
    )
    with pytest.raises(KVCacheIntegrityError, match="hash"):
        kv.check_integrity()


def test_bad_construction_is_a_named_error():
    with pytest.raises(KVCacheError):
        KVCacheManager(num_blocks=0, block_size=BS)
    with pytest.raises(KVCacheError):
        KVCacheManager(num_blocks=4, block_size=0)


def test_same_content_after_another_copy_of_its_parent_is_not_called_a_collision(
    monkeypatch, caplog
):
    """The parent was cached again (new serial) while the child cached after its first
    copy is in use: the new child stays uncached, quietly. Other tokens under the same hash
    are a real collision and are reported."""
    monkeypatch.setattr(hashing, "hash_block_tokens", lambda parent, toks: 42)
    pool = BlockPool(num_blocks=4)
    first, second, third = pool.take_fresh(3)
    cached = pool.register(first, ChainLink(1234, 10), (5, 6, 7, 8))
    with caplog.at_level(logging.DEBUG, logger="molink.kv_cache.block_pool"):
        again = pool.register(second, ChainLink(1234, 11), (5, 6, 7, 8))
    assert again == ChainLink(cached.block_hash, UNCACHED_SERIAL)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "another copy of its parent" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="molink.kv_cache.block_pool"):
        other = pool.register(third, ChainLink(1234, 10), (9, 9, 9, 9))
    assert other.serial == UNCACHED_SERIAL
    assert "hash collision" in caplog.text
