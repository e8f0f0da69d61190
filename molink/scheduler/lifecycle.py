"""The sequence lifecycle on the head: which queue each sequence is in, and what moves it.

A sequence waits, runs, and finishes; preemption and replay send a running one back to the
front of the waiting queue to start again from zero. ``SequenceLifecycle`` is the one owner
(the only writer) of the state those moves change; the scheduling pass
(``molink/scheduler/scheduler.py``) and plan outcomes (``molink/scheduler/outcomes.py``)
read it through the properties below and change it only by calling these methods:

* request records and the sequence-id map: created by ``add_request``, forgotten by
  ``release`` once every sequence of the request is finished and freed;
* the waiting queue, first come first served, and the siblings held back until their first
  sequence's prompt is in the prefix cache;
* the running list, in arrival order: ``admit`` inserts, ``prune_running`` drops whatever
  stopped running (finishing, preempting and replaying only mark it dirty, so that a
  scheduling pass walking the list never sees it change under it);
* the ids whose release the stages must still receive (the next plan's
  ``finished_seq_ids``);
* the replay queue (ids replayed since ``take_replayed``) and the preemption and replay
  counters;
* the tokens awaiting a spot check's verdict: every restart or finish voids a sequence's
  held token, so they are kept by the transitions that void them.

KV blocks belong to the ``KVCacheManager`` the scheduler is given; of the scheduler's parts
this one alone frees them (finish, preemption, replay), the scheduling pass alone allocates
them and plan outcomes alone register computed blocks in the prefix cache.

Single-threaded (the engine thread), like the rest of the scheduler.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Mapping
from collections.abc import Sequence as SequenceOf

from molink.kv_cache.manager import KVCacheManager
from molink.sampling_params import SamplingParams
from molink.scheduler.sequence import RequestRecord, Sequence, SequenceStatus, SequenceUpdate
from molink.step import SampledToken

logger = logging.getLogger(__name__)


def arrival_key(seq: Sequence) -> int:
    return seq.arrival_order


class SequenceLifecycle:
    def __init__(self, kv: KVCacheManager) -> None:
        self._kv = kv
        self._requests: dict[str, RequestRecord] = {}
        self._sequences: dict[int, Sequence] = {}
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # sorted by arrival order
        self._running_dirty = False
        self._num_held_siblings = 0
        self._pending_finished: list[int] = []
        self._next_seq_id = 0
        self._replayed: list[int] = []  # ids replayed since take_replayed()
        # Tokens awaiting a spot check's verdict: seq id -> (the step that sampled it, it).
        self._unverified: dict[int, tuple[int, SampledToken]] = {}
        # Counters since start, for metrics; only this class changes them.
        self.num_preemptions = 0
        self.num_replayed_sequences = 0
        self.num_replayed_tokens = 0  # tokens the replays must compute again

    # -- reads ---------------------------------------------------------------------------

    @property
    def running(self) -> SequenceOf[Sequence]:
        """Running sequences in arrival order (may still hold some that stopped, until
        ``prune_running``)."""
        return self._running

    @property
    def waiting(self) -> SequenceOf[Sequence]:
        """The waiting queue, head first (held siblings are not in it)."""
        return self._waiting

    @property
    def sequences(self) -> Mapping[int, Sequence]:
        """Every live sequence by id."""
        return self._sequences

    def get(self, seq_id: int) -> Sequence | None:
        return self._sequences.get(seq_id)

    def record(self, request_id: str) -> RequestRecord | None:
        return self._requests.get(request_id)

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting or self._num_held_siblings)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._num_held_siblings

    def is_release_pending(self, seq_id: int) -> bool:
        """Whether the stages have yet to receive ``seq_id``'s release."""
        return seq_id in self._pending_finished

    def is_unverified(self, seq_id: int) -> bool:
        return seq_id in self._unverified

    def unverified_ids(self) -> frozenset[int]:
        return frozenset(self._unverified)

    @property
    def num_unverified(self) -> int:
        return len(self._unverified)

    # -- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None,
        max_output_tokens: int,
    ) -> RequestRecord:
        """Record an already validated request and queue its sequences."""
        record = RequestRecord.create(
            request_id, prompt_token_ids, params, arrival_time, max_output_tokens, self._next_seq_id
        )
        self._next_seq_id += params.n
        self._sequences.update((seq.seq_id, seq) for seq in record.sequences)
        self._requests[request_id] = record
        self._queue_new_request(record)
        return record

    def _queue_new_request(self, record: RequestRecord) -> None:
        """Siblings share the prompt's blocks through the prefix cache: they wait until the
        first sequence has computed the prompt, then hit its full blocks."""
        first, *siblings = record.sequences
        self._waiting.append(first)
        if siblings and self._kv.enable_prefix_caching:
            record.held_siblings = siblings
            self._num_held_siblings += len(siblings)
        else:
            self._waiting.extend(siblings)

    def abort_request(self, request_id: str) -> None:
        """Finish every unfinished sequence of the request with reason "abort"."""
        record = self._requests.get(request_id)
        if record is None:
            return
        self._num_held_siblings -= len(record.held_siblings)
        record.held_siblings = []
        if any(seq.status is SequenceStatus.WAITING for seq in record.sequences):
            self._waiting = deque(seq for seq in self._waiting if seq.request is not record)
        for seq in record.sequences:
            if not seq.is_finished:
                self.finish(seq, "abort")
        self.prune_running()

    def finish_sequence(
        self, seq_id: int, reason: str, stop_reason: int | str | None = None
    ) -> None:
        """End one sequence from outside (e.g. a stop string matched); no-op if finished."""
        seq = self._sequences.get(seq_id)
        if seq is None or seq.is_finished:
            return
        if seq.status is SequenceStatus.WAITING:
            self._waiting = deque(s for s in self._waiting if s is not seq)
            if seq in seq.request.held_siblings:
                seq.request.held_siblings.remove(seq)
                self._num_held_siblings -= 1
        self.finish(seq, reason, stop_reason)
        self.prune_running()

    def fail_all(self, reason: str) -> list[SequenceUpdate]:
        """Fail every sequence and free every block; the caller forgets the plans in
        flight first (a sequence in one is released here, not when it comes back)."""
        updates = []
        self._waiting.clear()
        self._unverified.clear()
        self._replayed.clear()  # failed now: nothing of theirs is still to recover
        self._num_held_siblings = 0
        for seq in list(self._sequences.values()):
            seq.in_flight_step = None
            if not seq.is_finished:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "error"
                updates.append(SequenceUpdate.of(seq, None, error=reason))
            if not seq.is_released:
                self.release(seq)
        for record in self._requests.values():
            record.held_siblings = []
        self._running = []
        self._running_dirty = False
        return updates

    # -- admission -----------------------------------------------------------------------

    def admit(self, seq: Sequence, num_computed_tokens: int) -> None:
        """The head of the waiting queue starts running with ``num_computed_tokens`` found
        in the prefix cache (its blocks are already allocated)."""
        assert self._waiting and self._waiting[0] is seq
        self._waiting.popleft()
        seq.status = SequenceStatus.RUNNING
        seq.num_computed_tokens = num_computed_tokens
        bisect.insort(self._running, seq, key=arrival_key)

    def take_pending_finished(self) -> list[int]:
        """The ids whose release the next plan carries; the stages hear of each once."""
        finished, self._pending_finished = self._pending_finished, []
        return finished

    # -- restarts ------------------------------------------------------------------------

    def preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks; it restarts from zero at the front of the
        waiting queue."""
        self.num_preemptions += 1
        self._unverified.pop(seq.seq_id, None)
        logger.debug("preempting sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)
        self._kv.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.replay_pending = False  # it restarts from scratch anyway
        seq.num_computed_tokens = 0
        self._forget_on_stages(seq)
        self._waiting.appendleft(seq)
        self._running_dirty = True

    def replay(self, seq_ids: list[int], before_step: int | None = None) -> None:
        """Their KV was lost with a node: send them again from scratch on another route
        (those in flight once their plan comes back). Unknown or finished ids are ignored,
        and so are copies first sent in step ``before_step`` or later: the failed step's
        result may replay a sequence, and the sequence be sent again, before the report of
        the loss arrives; that copy is not on the lost node."""
        seqs = [self._sequences[s] for s in seq_ids if s in self._sequences]
        # Newest first, each to the front of the queue: the oldest ends up first.
        for seq in sorted(seqs, key=arrival_key, reverse=True):
            if seq.is_finished or seq.status is SequenceStatus.WAITING:
                continue
            if before_step is not None and (seq.sent_in_step or 0) >= before_step:
                continue
            if seq.is_in_flight:
                seq.replay_pending = True
            else:
                self.replay_sequence(seq)
        self.prune_running()

    def replay_sequence(self, seq: Sequence) -> None:
        """Like a preemption, but counted as a replay (its route lost a node or its token
        was refused); a sequence that is not running only loses its pending replay."""
        seq.replay_pending = False
        self._unverified.pop(seq.seq_id, None)
        if seq.status is not SequenceStatus.RUNNING:
            return
        seq.num_replays += 1
        self._replayed.append(seq.seq_id)
        self.num_replayed_sequences += 1
        self.num_replayed_tokens += seq.num_tokens
        self._kv.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self._forget_on_stages(seq)  # frees what the surviving nodes of its route hold
        self._waiting.appendleft(seq)
        self._running_dirty = True

    def take_replayed(self) -> list[int]:
        """The sequences replayed since the last call (to time their recovery)."""
        replayed, self._replayed = self._replayed, []
        return replayed

    # -- tokens awaiting a verdict ---------------------------------------------------------

    def hold_unverified(self, seq_id: int, step_id: int, token: SampledToken) -> None:
        self._unverified[seq_id] = (step_id, token)

    def take_unverified(self, seq_id: int, step_id: int) -> SampledToken | None:
        """The token ``step_id`` sampled for ``seq_id`` if it is still held (None: unknown,
        or stale because the sequence restarted or finished since); no longer held after."""
        held = self._unverified.get(seq_id)
        if held is None or held[0] != step_id:
            return None
        del self._unverified[seq_id]
        return held[1]

    # -- finishing -----------------------------------------------------------------------

    def finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark finished; blocks are freed now, or when its in-flight plan comes back."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self._unverified.pop(seq.seq_id, None)
        self._running_dirty = True
        if seq.seq_index == 0:
            self.release_held_siblings(seq.request)
        if not seq.is_in_flight:
            self.release(seq)

    def release(self, seq: Sequence) -> None:
        """Free a finished sequence's blocks for good; forget its request once all its
        sequences are released."""
        assert seq.is_finished and not seq.is_released
        seq.is_released = True
        self._kv.free(seq.seq_id)
        self._forget_on_stages(seq)
        record = seq.request
        record.num_released += 1
        if record.is_done:
            del self._requests[record.request_id]
            for done in record.sequences:
                del self._sequences[done.seq_id]

    def _forget_on_stages(self, seq: Sequence) -> None:
        if seq.known_to_stages:
            self._pending_finished.append(seq.seq_id)
            seq.known_to_stages = False
        seq.num_blocks_sent = 0

    def release_held_siblings(self, record: RequestRecord) -> None:
        """The first sequence computed its prompt (or finished): its siblings go to the
        front of the waiting queue, in index order."""
        if not record.held_siblings:
            return
        self._num_held_siblings -= len(record.held_siblings)
        self._waiting.extendleft(reversed(record.held_siblings))
        record.held_siblings = []

    def prune_running(self) -> None:
        if self._running_dirty:
            self._running = [s for s in self._running if s.status is SequenceStatus.RUNNING]
            self._running_dirty = False
