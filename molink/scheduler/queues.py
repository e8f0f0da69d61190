"""Read-only questions about the scheduler's queues that the engine asks between steps."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

from molink.scheduler.sequence import Sequence, SequenceStatus


def prefill_candidates(
    running: SequenceOf[Sequence], waiting: SequenceOf[Sequence]
) -> list[Sequence]:
    """The sequences whose prefill the next plan would advance first: the oldest idle
    running sequence with more than one token left to compute, and the head of the waiting
    queue (either may be missing).

    ``running`` is in arrival order, so the scan stops at the first match: O(running) at
    worst, nothing beyond the head of ``waiting``.
    """
    candidates = []
    for seq in running:
        if seq.status is SequenceStatus.RUNNING and not seq.is_in_flight:
            if seq.num_uncomputed_tokens > 1:
                candidates.append(seq)
                break
    if waiting:
        candidates.append(waiting[0])
    return candidates


def num_decoding(running: SequenceOf[Sequence]) -> int:
    """Running sequences past their prompt (decoding now, or with a decode in flight)."""
    return sum(1 for seq in running if seq.num_uncomputed_tokens <= 1)
