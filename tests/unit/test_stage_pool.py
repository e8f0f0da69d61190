"""A node's own KV blocks: all-or-nothing growth, isolation and fair share between heads."""

from __future__ import annotations

import pytest

from molink.kv_cache.stage_pool import ACTIVE_S, KVRoomError, StageBlockPool


def test_growth_is_all_or_nothing_and_frees_return_blocks() -> None:
    pool = StageBlockPool(num_blocks=4, block_size=4)
    pool.add(("h", 1))
    pool.add(("h", 2))
    pool.grow({("h", 1): 8})
    assert len(pool.table(("h", 1))) == 2 and pool.num_free == 2
    with pytest.raises(KVRoomError, match="needs 3 more blocks"):
        pool.grow({("h", 1): 9, ("h", 2): 8})
    assert len(pool.table(("h", 1))) == 2 and pool.table(("h", 2)) == [] and pool.num_free == 2
    pool.free(("h", 1))
    assert pool.num_free == 4 and pool.table(("h", 1)) is None


def test_heads_never_touch_each_other() -> None:
    pool = StageBlockPool(num_blocks=8, block_size=4)
    pool.add(("a", 1))
    pool.add(("b", 1))
    pool.grow({("a", 1): 4, ("b", 1): 4})
    assert set(pool.table(("a", 1))).isdisjoint(pool.table(("b", 1)))
    pool.free(("b", 7))  # another head's unknown id frees nothing
    assert pool.free_head("b") == 1
    assert pool.table(("a", 1)) is not None and pool.num_free == 7
    assert [(u.head_id, u.sequences, u.blocks) for u in pool.usage()] == [("a", 1, 1)]


def test_a_busy_head_cannot_starve_another() -> None:
    pool = StageBlockPool(num_blocks=8, block_size=1)
    for seq in range(8):
        pool.add(("busy", seq))
    pool.grow({("busy", seq): 1 for seq in range(7)}, now=0.0)  # alone: may take 7 of 8
    pool.add(("quiet", 0))
    with pytest.raises(KVRoomError):
        pool.grow({("quiet", 0): 2}, now=1.0)  # one block left
    for seq in range(3):
        pool.free(("busy", seq))
    # Now "quiet" is active: "busy" (4 held) may not grow into quiet's share of 4.
    with pytest.raises(KVRoomError, match="may take 0"):
        pool.grow({("busy", 7): 1}, now=2.0)
    pool.grow({("quiet", 0): 4}, now=2.0)
    assert [(u.head_id, u.blocks) for u in pool.usage()] == [("busy", 4), ("quiet", 4)]


def test_a_refusal_is_forgotten_once_it_no_longer_counts() -> None:
    """A node serving many heads over its life keeps no record of refusals older than
    ACTIVE_S: they no longer make their head active."""
    pool = StageBlockPool(num_blocks=2, block_size=1)
    pool.add(("big", 0))
    pool.grow({("big", 0): 2}, now=0.0)
    for head in range(50):
        pool.add((f"h{head}", 0))
        with pytest.raises(KVRoomError):
            pool.grow({(f"h{head}", 0): 1}, now=0.0)
    pool.free(("big", 0))
    pool.add(("late", 0))
    pool.grow({("late", 0): 2}, now=ACTIVE_S + 1.0)  # alone again: may take every block
    assert pool._refused_at == {}
