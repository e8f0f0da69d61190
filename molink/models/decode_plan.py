"""Where each decoding sequence's keys lie in the paged cache, so that they are read in place.

On a CPU, the batched decode path gathers every sequence's blocks into one padded tensor
on every layer of every step: O(context) bytes copied, then read again by attention. For
long contexts that copy is most of the step. Block ids that follow one another hold
consecutive slots, so a run of them is a plain strided view of the cache: attention can
read it where it lies. A sequence's tokens are split here, once per forward, into

* ``views``: runs of consecutive slots at least ``MIN_VIEW_TOKENS`` long (a prompt
  prefilled in one chunk is one run), read in place by every layer;
* ``gathered``: the slots of the short runs (the blocks a decode adds one at a time,
  interleaved with other sequences'), copied per layer: O(generated tokens), not O(context).

Only the positions a token attends to are planned (a sliding window drops the rest), so
no mask is needed. Sequences shorter than ``IN_PLACE_MIN_TOKENS`` stay on the batched
path, where one call for the whole batch beats a call per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Measured on SmolLM2's shapes (3 kv heads of 64, groups of 3), 8 sequences, one thread,
# ms per layer, padded gather + one call vs one call per sequence over views: 64 tokens
# 1.29 vs 1.76, 128: 1.74 vs 2.49, 256: 4.43 vs 4.19, 512: 13.0 vs 9.4.
IN_PLACE_MIN_TOKENS = 256
# A run shorter than this is cheaper to copy with the other short runs than to read as
# its own view (each view costs two small matmuls per layer).
MIN_VIEW_TOKENS = 64


@dataclass(frozen=True)
class SlotRun:
    start: int  # first slot (block_id * block_size + offset) in the flattened cache
    length: int


@dataclass(frozen=True)
class InPlaceDecode:
    """One decoding sequence: its row in the batch and where its attended keys lie."""

    row: int
    views: tuple[SlotRun, ...]
    gathered: torch.Tensor | None  # slot ids [n] of the other attended tokens, or None
    num_keys: int
    # Where each view and each gathered slot lies among the attended keys (0 = the first
    # attended position): enough to lay the pieces out again in position order.
    view_offsets: tuple[int, ...] = ()
    gathered_offsets: torch.Tensor | None = None


def slot_runs(block_ids: Sequence[int], block_size: int, lo: int, hi: int) -> list[SlotRun]:
    """Positions ``[lo, hi)`` of a sequence as runs of consecutive cache slots."""
    runs: list[SlotRun] = []
    for j in range(lo // block_size, -(-hi // block_size)):
        first = max(lo, j * block_size)
        last = min(hi, (j + 1) * block_size)
        start = block_ids[j] * block_size + first - j * block_size
        if runs and runs[-1].start + runs[-1].length == start:
            runs[-1] = SlotRun(runs[-1].start, runs[-1].length + last - first)
        else:
            runs.append(SlotRun(start, last - first))
    return runs


def plan_in_place(
    row: int,
    block_ids: Sequence[int],
    length: int,
    block_size: int,
    window: int | None,
    device: torch.device | str,
) -> InPlaceDecode:
    """The plan for a sequence whose new token is its ``length``-th."""
    lo = max(0, length - window) if window is not None else 0
    views: list[SlotRun] = []
    view_offsets: list[int] = []
    slots: list[int] = []
    slot_offsets: list[int] = []
    offset = 0
    for run in slot_runs(block_ids, block_size, lo, length):
        if run.length >= MIN_VIEW_TOKENS:
            views.append(run)
            view_offsets.append(offset)
        else:
            slots.extend(range(run.start, run.start + run.length))
            slot_offsets.extend(range(offset, offset + run.length))
        offset += run.length
    gathered = gathered_offsets = None
    if slots:
        gathered = torch.tensor(slots, dtype=torch.long, device=device)
        gathered_offsets = torch.tensor(slot_offsets, dtype=torch.long, device=device)
    return InPlaceDecode(
        row, tuple(views), gathered, length - lo, tuple(view_offsets), gathered_offsets
    )
