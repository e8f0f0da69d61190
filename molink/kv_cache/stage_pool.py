"""A node's own KV blocks, for the sequences of every head that sends it work.

Sequences are keyed by (head id, sequence id), so one head can never name, free or
overwrite another head's blocks. Growth is all-or-nothing per step (``grow``): a step
whose sequences do not all fit is refused with ``KVRoomError`` and nothing is kept, so
the head can preempt and try again later.

Fair share between heads. Every *active* head (one that holds a sequence here, or was
refused within ``ACTIVE_S``) is guaranteed ``num_blocks // active heads`` blocks. A head
may use more than its guarantee, but only out of blocks that no other active head's unused
guarantee needs::

    allowed(h, extra)  <=>  extra <= free - sum over active g != h of max(0, share - used(g))

So a busy head fills the node while it is alone; once a second head arrives, the first can
no longer grow into the second's share, and the blocks it frees go to the second until
both hold their share. A busy head cannot starve another.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from molink.errors import MolinkError

SeqKey = tuple[str, int]  # (head id, sequence id)

ACTIVE_S = 10.0  # a refused head counts as active for this long


class KVRoomError(MolinkError):
    """This node cannot hold the step's sequences now (the pool or the head's share is
    full); nothing of the step was kept."""


@dataclass(frozen=True)
class HeadUsage:
    head_id: str
    sequences: int
    blocks: int


class StageBlockPool:
    """Thread-safe: the compute thread grows and frees, status readers read."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("a stage pool needs at least one block of at least one token")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))
        self._tables: dict[SeqKey, list[int]] = {}
        self._used: dict[str, int] = {}  # head id -> blocks held
        self._refused_at: dict[str, float] = {}
        self._lock = threading.Lock()

    @property
    def num_free(self) -> int:
        with self._lock:
            return len(self._free)

    def table(self, key: SeqKey) -> list[int] | None:
        """The live block table of a sequence (grown in place by ``grow``)."""
        return self._tables.get(key)

    def add(self, key: SeqKey) -> list[int]:
        """Start a sequence from scratch (a re-sent sequence loses its old blocks)."""
        self.free(key)
        with self._lock:
            table = self._tables[key] = []
        return table

    def grow(self, needs: dict[SeqKey, int], now: float | None = None) -> None:
        """Give each sequence blocks for ``needs[key]`` tokens, all or none; raise
        KVRoomError naming what was missing. Sequences must have been ``add``-ed."""
        now = time.monotonic() if now is None else now
        with self._lock:
            extra_by_head: dict[str, int] = {}
            for key, num_tokens in needs.items():
                missing = -(-num_tokens // self.block_size) - len(self._tables[key])
                if missing > 0:
                    extra_by_head[key[0]] = extra_by_head.get(key[0], 0) + missing
            for head_id, extra in extra_by_head.items():
                room = self._room_locked(head_id, now)
                if extra > room:
                    self._refused_at[head_id] = now
                    raise KVRoomError(
                        f"no KV room: the step needs {extra} more blocks, head {head_id!r} "
                        f"may take {room} now ({len(self._free)} of {self.num_blocks} free)"
                    )
            for key, num_tokens in needs.items():
                table = self._tables[key]
                while len(table) * self.block_size < num_tokens:
                    table.append(self._free.pop())
                    self._used[key[0]] = self._used.get(key[0], 0) + 1

    def free(self, key: SeqKey) -> None:
        with self._lock:
            table = self._tables.pop(key, None)
            if not table:
                return
            self._free.extend(table)
            left = self._used[key[0]] - len(table)
            if left:
                self._used[key[0]] = left
            else:
                del self._used[key[0]]

    def free_head(self, head_id: str) -> int:
        """Free every sequence of one head; returns how many there were."""
        keys = [key for key in list(self._tables) if key[0] == head_id]
        for key in keys:
            self.free(key)
        return len(keys)

    def usage(self) -> list[HeadUsage]:
        with self._lock:
            counts: dict[str, int] = {}
            for head_id, _ in self._tables:
                counts[head_id] = counts.get(head_id, 0) + 1
            return [
                HeadUsage(head_id, counts[head_id], self._used.get(head_id, 0))
                for head_id in sorted(counts)
            ]

    def _room_locked(self, head_id: str, now: float) -> int:
        # A refusal older than ACTIVE_S no longer counts: forget it, so that a node serving
        # many heads over its life keeps no record per head it ever refused.
        self._refused_at = {h: t for h, t in self._refused_at.items() if now - t < ACTIVE_S}
        active = set(self._used) | set(self._refused_at)
        active.add(head_id)
        share = self.num_blocks // len(active)
        reserved = sum(max(0, share - self._used.get(g, 0)) for g in active if g != head_id)
        return max(0, len(self._free) - reserved)
