"""Read-only questions about the scheduler's queues that the engine asks between steps."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

from molink.scheduler.sequence import Sequence, SequenceStatus


def oldest_prefill_arrival(
    running: SequenceOf[Sequence], waiting: SequenceOf[Sequence]
) -> float | None:
    """The ``arrival_time`` of the oldest request whose prefill the next plan could advance:
    the oldest idle running sequence with more than one token left to compute, or the head
    of the waiting queue. None when there is none, or it came without an arrival time.

    ``running`` is in arrival order, so the scan stops at the first match: O(running) at
    worst, nothing beyond the head of ``waiting``.
    """
    candidates = [waiting[0]] if waiting else []
    for seq in running:
        if seq.status is SequenceStatus.RUNNING and not seq.is_in_flight:
            if seq.num_uncomputed_tokens > 1:
                candidates.append(seq)
                break
    times = [seq.request.arrival_time for seq in candidates]
    return min((t for t in times if t is not None), default=None)


def num_decoding(running: SequenceOf[Sequence]) -> int:
    """Running sequences past their prompt (decoding now, or with a decode in flight)."""
    return sum(1 for seq in running if seq.num_uncomputed_tokens <= 1)
