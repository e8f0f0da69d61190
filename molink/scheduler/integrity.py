"""Invariants of the scheduler's queues, checked on demand (tests call it after every step)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from collections.abc import Sequence as SequenceOf

from molink.kv_cache.manager import KVCacheManager
from molink.scheduler.errors import SchedulerIntegrityError
from molink.scheduler.in_flight import InFlightPlans
from molink.scheduler.sequence import Sequence, SequenceStatus


def check_scheduler_integrity(
    running: SequenceOf[Sequence],
    waiting: Iterable[Sequence],
    in_flight: InFlightPlans,
    sequences: Mapping[int, Sequence],
    kv: KVCacheManager,
    max_num_seqs: int,
    unverified: frozenset[int] = frozenset(),
) -> None:
    """``unverified``: sequences whose last token awaits a spot check's verdict (they have
    nothing to compute until it comes)."""
    _check_running(running, kv, max_num_seqs, unverified)
    _check_waiting(waiting, kv)
    in_flight_ids = _check_in_flight(in_flight, kv)
    for seq in sequences.values():
        if seq.is_in_flight and seq.seq_id not in in_flight_ids:
            _fail(f"sequence {seq.seq_id} is marked in flight but no plan holds it")
        if seq.is_released and kv.has_sequence(seq.seq_id):
            _fail(f"released sequence {seq.seq_id} still holds blocks")
    holders = {seq.seq_id for seq in running} | in_flight_ids
    if kv.num_sequences != len(holders):
        _fail(f"{kv.num_sequences} sequences hold blocks, expected {len(holders)}")


def _fail(message: str) -> None:
    raise SchedulerIntegrityError(message)


def _check_running(
    running: SequenceOf[Sequence], kv: KVCacheManager, max_num_seqs: int, unverified: frozenset[int]
) -> None:
    if len(running) > max_num_seqs:
        _fail(f"{len(running)} sequences running, the limit is {max_num_seqs}")
    previous = -1
    for seq in running:
        if seq.status is not SequenceStatus.RUNNING:
            _fail(f"{seq!r} is in the running list")
        if seq.arrival_order <= previous:
            _fail("the running list is not in arrival order")
        previous = seq.arrival_order
        num_slots = len(kv.block_table(seq.seq_id)) * kv.block_size
        if num_slots < seq.num_computed_tokens:
            _fail(f"{seq!r} has blocks for only {num_slots} tokens")
        if not seq.is_in_flight and seq.num_uncomputed_tokens < 1 and seq.seq_id not in unverified:
            _fail(f"{seq!r} has nothing left to compute")
        if not seq.known_to_stages or seq.num_blocks_sent > len(kv.block_table(seq.seq_id)):
            _fail(f"{seq!r}: the stages' view of it is inconsistent")


def _check_waiting(waiting: Iterable[Sequence], kv: KVCacheManager) -> None:
    seen = set()
    for seq in waiting:
        if seq.seq_id in seen:
            _fail(f"{seq!r} is queued twice")
        seen.add(seq.seq_id)
        if seq.status is not SequenceStatus.WAITING:
            _fail(f"{seq!r} is in the waiting queue")
        if seq.num_computed_tokens or seq.is_in_flight or kv.has_sequence(seq.seq_id):
            _fail(f"waiting {seq!r} holds computed tokens, blocks or a plan")
        if seq.known_to_stages:
            _fail(f"waiting {seq!r} is still known to the stages")


def _check_in_flight(in_flight: InFlightPlans, kv: KVCacheManager) -> set[int]:
    ids: set[int] = set()
    for step_id, step in in_flight.items():
        for scheduled, seq in zip(step.plan.scheduled, step.sequences, strict=True):
            if seq.seq_id in ids:
                _fail(f"sequence {seq.seq_id} is in two plans in flight")
            ids.add(seq.seq_id)
            if seq.in_flight_step != step_id or scheduled.seq_id != seq.seq_id:
                _fail(f"sequence {seq.seq_id} disagrees with in-flight plan {step_id}")
            end = scheduled.num_computed_tokens + scheduled.num_new_tokens
            if len(kv.block_table(seq.seq_id)) * kv.block_size < end:
                _fail(f"sequence {seq.seq_id} lacks blocks for its in-flight tokens")
    return ids
