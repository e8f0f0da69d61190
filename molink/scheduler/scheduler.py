"""Continuous batching by token catch-up, with chunked prefill, preemption and micro-batches.

Each sequence has ``num_tokens`` (prompt + outputs) and ``num_computed_tokens`` (tokens
whose KV every stage holds). A step gives sequences new tokens so that the computed count
catches up; a step whose chunk reaches the end of the known tokens samples one more token.

``schedule`` fills one plan under a token budget, in this order:

1. running sequences that decode (one token each), oldest first, at most ``max_decodes``;
2. running sequences part-way through their prefill, one chunk each, oldest first;
3. waiting sequences, first come first served, while their chunk's blocks fit; admission
   stops at the first one that does not fit, and is skipped in a step that preempted (so
   no plan both forgets a sequence and sends it again).

Prefill chunks (2 and 3) also draw on ``prefill_token_budget`` when one is given, so the
head can bound how many prompt tokens one plan puts on a slow link while decodes, which
come first and count against ``token_budget`` only, are never crowded out. The chunks of
replayed sequences draw on ``replay_token_budget`` as well, so that rebuilding the KV of
sequences moved off a lost node shares each step with the decodes instead of taking it.

Several plans (micro-batches) may be in flight. A sequence in a plan is off limits until
``update`` for that plan, so plans are disjoint; finishing or aborting an in-flight
sequence only marks it, and its blocks are freed when its plan comes back.

When a sequence needs a block and none is free, the most recently arrived running
sequence that is not in flight (and not already in this plan), and arrived after the one
in need, is preempted: its blocks are freed, it restarts from zero at the front of the
waiting queue, its id is sent in ``finished_seq_ids`` and it is sent again in
``new_sequences`` with all its tokens when re-admitted. If there is no such sequence, the
one in need waits for this step. Older sequences never yield to newer ones.

When a node holding a sequence's KV is lost (``replay``, or a plan that failed with a
node failure), the sequence is replayed: like a preemption it restarts from zero at the
front of the waiting queue with all its tokens, and the head sends it to another route.
A sequence in flight at that moment is replayed when its plan comes back. After
``MAX_REPLAYS`` replays it fails instead (a node that fails it every time).

A result may name sequences whose token awaits a spot check's verdict (``held_seq_ids``):
their KV counts as computed, but the token is kept apart and the sequence is not scheduled
until ``resolve_unverified`` says whether the token stands (it is appended and reported
then) or not (it is dropped and the sequence replays from its last verified token).

Cost per call: O(running) plus the work for what is scheduled; no scans of the waiting
queue beyond its head.
"""

from __future__ import annotations

import bisect
import logging
from collections import deque
from collections.abc import Callable

from molink.config import SchedulerConfig
from molink.errors import InvalidParameterError
from molink.kv_cache.manager import KVCacheManager
from molink.sampling_params import SamplingParams
from molink.scheduler.in_flight import InFlightPlans, InFlightView
from molink.scheduler.integrity import check_scheduler_integrity
from molink.scheduler.plan_builder import PlanBuilder, VictimCursor, check_step_limit
from molink.scheduler.queues import num_decoding, prefill_candidates
from molink.scheduler.sequence import (
    RequestRecord,
    Sequence,
    SequenceStatus,
    SequenceTokens,
    SequenceUpdate,
)
from molink.scheduler.stop import check_stop
from molink.scheduler.validation import max_output_tokens_for
from molink.step import FailureKind, SampledToken, StepPlan, StepResult

logger = logging.getLogger(__name__)


# (sequence id, tokens it will hold after this step, or for a sequence not yet admitted the
# most it may ever hold) -> may it join this plan? The head's
# router uses it to keep each plan on one route (molink/engine/routing.py).
SequenceFilter = Callable[[int, int], bool]

# Failures after which a plan's sequences are replayed rather than failed.
REPLAYABLE = frozenset(
    {FailureKind.UNREACHABLE, FailureKind.DEADLINE, FailureKind.NODE_ERROR, FailureKind.REJECTED}
)
MAX_REPLAYS = 8


def _arrival_key(seq: Sequence) -> int:
    return seq.arrival_order


class Scheduler:
    def __init__(
        self,
        scheduler_config: SchedulerConfig,
        kv: KVCacheManager,
        eos_token_ids: tuple[int, ...],
    ) -> None:
        scheduler_config.validate()
        self.config = scheduler_config
        self.kv = kv
        self.eos_token_ids = frozenset(eos_token_ids)
        self._requests: dict[str, RequestRecord] = {}
        self._sequences: dict[int, Sequence] = {}
        self._waiting: deque[Sequence] = deque()
        self._running: list[Sequence] = []  # sorted by arrival order
        # The one registry of plans in flight; the engine reads it, only this class writes.
        self._in_flight = InFlightPlans()
        self._pending_finished: list[int] = []
        self._num_held_siblings = 0
        self._running_dirty = False
        self._next_seq_id = 0
        self._next_step_id = 0
        # Counters since start, for metrics.
        self.num_preemptions = 0
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up
        self.prefix_cache_hits = 0  # of those, tokens found in the cache
        self.num_replayed_sequences = 0
        self.num_replayed_tokens = 0  # tokens the replays must compute again
        self._replayed: list[int] = []  # ids replayed since take_replayed()
        # Tokens awaiting a spot check's verdict: seq id -> (the step that sampled it, it).
        self._unverified: dict[int, tuple[int, SampledToken]] = {}

    # -- requests ------------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> list[int]:
        """Queue a request's n sequences; returns their ids (index i is sequence i).

        Sequences are served in the order of these calls; ``arrival_time`` is only kept.

        Raises InvalidParameterError (empty prompt, duplicate id), ContextLengthExceededError
        or OutOfCapacityError (it could never fit in the whole KV cache).
        """
        if request_id in self._requests:
            raise InvalidParameterError("request_id", f"{request_id!r} is already queued")
        max_output = max_output_tokens_for(
            prompt_token_ids,
            params,
            self.config.max_model_len,
            self.kv.num_total_blocks,
            self.kv.block_size,
        )
        record = RequestRecord.create(
            request_id, prompt_token_ids, params, arrival_time, max_output, self._next_seq_id
        )
        self._next_seq_id += params.n
        self._sequences.update((seq.seq_id, seq) for seq in record.sequences)
        self._requests[request_id] = record
        self._queue_new_request(record)
        return [seq.seq_id for seq in record.sequences]

    def _queue_new_request(self, record: RequestRecord) -> None:
        """Siblings share the prompt's blocks through the prefix cache: they wait until the
        first sequence has computed the prompt, then hit its full blocks."""
        first, *siblings = record.sequences
        self._waiting.append(first)
        if siblings and self.kv.enable_prefix_caching:
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
                self._finish(seq, "abort")
        self._prune_running()

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
        self._finish(seq, reason, stop_reason)
        self._prune_running()

    def fail_all(self, reason: str) -> list[SequenceUpdate]:
        """The pipeline is gone: fail every sequence, free every block, forget in-flight
        plans (a late result for one is ignored) and the prefix cache."""
        updates = []
        self._in_flight.clear()
        self._waiting.clear()
        self._unverified.clear()
        self._num_held_siblings = 0
        for seq in list(self._sequences.values()):
            seq.in_flight_step = None
            if not seq.is_finished:
                seq.status = SequenceStatus.FINISHED
                seq.finish_reason = "error"
                updates.append(SequenceUpdate.of(seq, None, error=reason))
            if not seq.is_released:
                self._release(seq)
        for record in self._requests.values():
            record.held_siblings = []
        self._running = []
        self._running_dirty = False
        self.kv.reset_prefix_cache()
        logger.error("failed %d sequences: %s", len(updates), reason)
        return updates

    def replay(self, seq_ids: list[int]) -> None:
        """Their KV was lost with a node: send them again from scratch on another route
        (those in flight once their plan comes back). Unknown or finished ids are ignored."""
        seqs = [self._sequences[s] for s in seq_ids if s in self._sequences]
        # Newest first, each to the front of the queue: the oldest ends up first.
        for seq in sorted(seqs, key=_arrival_key, reverse=True):
            if seq.is_finished or seq.status is SequenceStatus.WAITING:
                continue
            if seq.is_in_flight:
                seq.replay_pending = True
            else:
                self._replay(seq)
        self._prune_running()

    def take_replayed(self) -> list[int]:
        """The sequences replayed since the last call (to time their recovery)."""
        replayed, self._replayed = self._replayed, []
        return replayed

    # -- lookups -------------------------------------------------------------------------

    def get_sequence(self, seq_id: int) -> Sequence | None:
        """A live sequence (read only). Forgotten once every sequence of its request is
        finished and freed."""
        return self._sequences.get(seq_id)

    def request_tokens(self, request_id: str) -> list[SequenceTokens]:
        """Read access to the tokens of a queued request's sequences (index i is sequence
        i; empty for an unknown request). The references stay valid, and keep following
        each sequence, after the scheduler forgets the request."""
        record = self._requests.get(request_id)
        return [] if record is None else list(record.sequences)

    def request_id_of(self, seq_id: int) -> str | None:
        seq = self._sequences.get(seq_id)
        return None if seq is None else seq.request_id

    def seq_ids_of(self, request_id: str) -> list[int]:
        record = self._requests.get(request_id)
        return [] if record is None else [seq.seq_id for seq in record.sequences]

    def has_unfinished(self) -> bool:
        return bool(self._running or self._waiting or self._num_held_siblings)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting) + self._num_held_siblings

    @property
    def in_flight(self) -> InFlightView:
        """The plans handed out by ``schedule`` and not yet passed to ``update``."""
        return self._in_flight

    @property
    def num_in_flight(self) -> int:
        """Plans handed out by ``schedule`` and not yet passed to ``update``."""
        return len(self._in_flight)

    @property
    def num_in_flight_sequences(self) -> int:
        return self._in_flight.num_sequences

    @property
    def num_decoding(self) -> int:
        """Running sequences past their prompt; O(running)."""
        return num_decoding(self._running)

    def prefill_candidate_ids(self) -> list[int]:
        """Sequence ids of ``molink.scheduler.queues.prefill_candidates``."""
        return [seq.seq_id for seq in prefill_candidates(self._running, self._waiting)]

    def check_integrity(self) -> None:
        """Raise (KVCacheIntegrityError, SchedulerIntegrityError) if an invariant broke."""
        self.kv.check_integrity()
        check_scheduler_integrity(
            self._running,
            self._waiting,
            self._in_flight,
            self._sequences,
            self.kv,
            self.config.max_num_seqs,
            frozenset(self._unverified),
        )

    # -- scheduling ----------------------------------------------------------------------

    def schedule(
        self,
        micro_batch: int = 0,
        token_budget: int | None = None,
        prefill_token_budget: int | None = None,
        max_decodes: int | None = None,
        accepts: SequenceFilter | None = None,
        replay_token_budget: int | None = None,
    ) -> StepPlan:
        """The next plan for ``micro_batch``; may be empty yet carry ``finished_seq_ids``,
        which the stages must still receive.

        ``token_budget`` (None: max_num_batched_tokens) bounds all tokens of the plan;
        ``prefill_token_budget`` (None: no further bound) bounds its prefill chunks only;
        ``max_decodes`` (None: no bound) caps its decoding sequences, so that the engine can
        spread the running sequences over the micro-batches in flight. ``accepts`` (None:
        every sequence) filters which sequences may join the plan; admission of waiting
        sequences stops at the first it refuses, so they stay first come, first served.
        ``replay_token_budget`` (None: no further bound) bounds the prefill chunks of
        replayed sequences (those moved off a lost node) in the plan.
        """
        budget = self.config.max_num_batched_tokens if token_budget is None else token_budget
        check_step_limit(budget, "token_budget")
        check_step_limit(prefill_token_budget, "prefill_token_budget")
        check_step_limit(max_decodes, "max_decodes")
        check_step_limit(replay_token_budget, "replay_token_budget")
        builder = PlanBuilder(
            self._next_step_id,
            micro_batch,
            budget,
            prefill_token_budget,
            max_decodes,
            replay_token_budget,
        )
        self._next_step_id += 1
        victims = VictimCursor(self._running)
        self._schedule_running(builder, victims, True, accepts)
        self._schedule_running(builder, victims, False, accepts)
        self._prune_running()
        if victims.num_preempted == 0:
            self._admit_waiting(builder, accepts)
        plan = builder.build(self._pending_finished)
        self._pending_finished = []
        if not plan.is_empty:
            self._in_flight.add(plan, builder.sequences)
        return plan

    def _schedule_running(
        self,
        builder: PlanBuilder,
        victims: VictimCursor,
        decodes: bool,
        accepts: SequenceFilter | None,
    ) -> None:
        running_status = SequenceStatus.RUNNING
        for index, seq in enumerate(self._running):
            room = builder.decode_room if decodes else builder.prefill_room
            if room == 0:
                return
            if seq.status is not running_status or seq.in_flight_step is not None:
                continue
            if seq.seq_id in self._unverified:  # its next input is its unverified token
                continue
            num_uncomputed = len(seq.token_ids) - seq.num_computed_tokens
            if (num_uncomputed == 1) != decodes:
                continue
            room = room if decodes else builder.prefill_room_for(seq)
            if room == 0:  # a replay over its budget: other prefills may still fit
                continue
            num_new = self._chunk_size(num_uncomputed, room)
            if accepts is not None and not accepts(seq.seq_id, seq.num_computed_tokens + num_new):
                continue
            if self._allocate_or_preempt(seq, index, num_new, victims):
                builder.add(seq, num_new, self.kv.block_table(seq.seq_id), is_decode=decodes)

    def _allocate_or_preempt(
        self, seq: Sequence, index: int, num_new: int, victims: VictimCursor
    ) -> bool:
        while self.kv.allocate(seq.seq_id, seq.num_computed_tokens + num_new) is None:
            victim = victims.next_victim(newer_than_index=index)
            if victim is None:
                return False
            self._preempt(victim)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self._unverified.pop(seq.seq_id, None)
        logger.debug("preempting sequence %d (%d tokens)", seq.seq_id, seq.num_tokens)
        self.kv.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.replay_pending = False  # it restarts from scratch anyway
        seq.num_computed_tokens = 0
        self._forget_on_stages(seq)
        self._waiting.appendleft(seq)
        self._running_dirty = True

    def _admit_waiting(self, builder: PlanBuilder, accepts: SequenceFilter | None) -> None:
        while (
            self._waiting
            and builder.prefill_room > 0
            and len(self._running) < self.config.max_num_seqs
        ):
            seq = self._waiting[0]
            if seq.seq_id in self._pending_finished:
                # Preempted or replayed since the last plan: its release goes out first
                # (along its old route), then it is sent again.
                return
            # Prompt logprobs need every prompt position computed, so no prefix is reused.
            wants_prompt_logprobs = seq.params.prompt_logprobs is not None
            reusable = 0 if wants_prompt_logprobs else seq.num_tokens - 1
            hit = self.kv.find_cached_prefix(seq.token_ids, max_num_tokens=reusable)
            room = builder.prefill_room_for(seq)
            if room == 0:  # a replay over its budget waits, and those behind it too (FCFS)
                return
            num_new = self._chunk_size(seq.num_tokens - hit.num_tokens, room)
            # A new sequence asks for room for everything it may become (its prompt and
            # output so far plus the output it may still produce), so that nodes that own
            # their KV are not over-committed and then forced to refuse its growth.
            may_hold = seq.num_prompt_tokens + seq.max_output_tokens
            if accepts is not None and not accepts(seq.seq_id, max(may_hold, seq.num_tokens)):
                return
            if self.kv.allocate(seq.seq_id, hit.num_tokens + num_new, hit) is None:
                return
            self._waiting.popleft()
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += hit.num_tokens
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = hit.num_tokens
            bisect.insort(self._running, seq, key=_arrival_key)
            builder.add(seq, num_new, self.kv.block_table(seq.seq_id))

    def _chunk_size(self, num_uncomputed: int, budget_left: int) -> int:
        size = min(num_uncomputed, budget_left)
        threshold = self.config.long_prefill_token_threshold
        return min(size, threshold) if threshold > 0 else size

    # -- results -------------------------------------------------------------------------

    def update(self, plan: StepPlan, result: StepResult) -> list[SequenceUpdate]:
        """Apply a plan's result: advance counters, cache computed blocks, append sampled
        tokens, finish and free sequences that stop. A result with ``error`` (or for another
        step) fails every sequence of the plan."""
        entry = self._in_flight.pop(plan.step_id)
        if entry is None:
            if not plan.is_empty:
                logger.warning("update for step %d, which is not in flight; ignored", plan.step_id)
            return []
        sent_plan, seqs = entry.plan, entry.sequences
        error = result.error
        if error is None and result.step_id != sent_plan.step_id:
            error = f"result of step {result.step_id} given for step {sent_plan.step_id}"
        if error is not None and result.failure_kind is FailureKind.KV_FULL:
            updates = self._requeue_plan(seqs)
        elif error is not None and result.failure_kind in REPLAYABLE:
            updates = self._replay_plan(seqs, error)
        elif error is not None:
            updates = self._fail_plan(seqs, error)
        else:
            updates = self._apply_result(sent_plan, seqs, result)
        self._prune_running()
        return updates

    def _apply_result(
        self, plan: StepPlan, seqs: list[Sequence], result: StepResult
    ) -> list[SequenceUpdate]:
        sampled = {token.seq_id: token for token in result.sampled}
        updates = []
        for scheduled, seq in zip(plan.scheduled, seqs, strict=True):
            seq.in_flight_step = None
            if seq.is_finished:  # aborted or stopped while in flight
                self._release(seq)
                continue
            seq.num_computed_tokens += scheduled.num_new_tokens
            self.kv.register_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.seq_index == 0 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                self._release_held_siblings(seq.request)
            token = sampled.get(seq.seq_id)
            if scheduled.sample and seq.seq_id in result.held_seq_ids and token is not None:
                if not seq.replay_pending:  # else its route lost a node: it replays without
                    self._unverified[seq.seq_id] = (plan.step_id, token)
            elif scheduled.sample:
                updates.append(self._accept_sample(seq, token))
            if seq.replay_pending and not seq.is_finished:
                self._replay(seq)
        return updates

    @property
    def num_unverified(self) -> int:
        """Sequences whose last token awaits a spot check's verdict."""
        return len(self._unverified)

    def resolve_unverified(self, seq_id: int, step_id: int, keep: bool) -> list[SequenceUpdate]:
        """The verdict on the token ``step_id`` sampled for ``seq_id``: kept (appended and
        reported, as ``update`` would have) or dropped (the sequence replays from the
        tokens it has). Unknown, stale (the sequence restarted since) and finished ones
        are ignored."""
        held = self._unverified.get(seq_id)
        if held is None or held[0] != step_id:
            return []
        del self._unverified[seq_id]
        seq = self._sequences.get(seq_id)
        if seq is None or seq.status is not SequenceStatus.RUNNING:
            return []
        if not keep:
            self._replay(seq)
            self._prune_running()
            return []
        update = self._accept_sample(seq, held[1])
        self._prune_running()
        return [update]

    def _accept_sample(self, seq: Sequence, token: SampledToken | None) -> SequenceUpdate:
        if token is None or token.error is not None:
            message = f"the last stage sampled no token for sequence {seq.seq_id}"
            if token is not None:
                message = f"sequence {seq.seq_id} failed on the last stage: {token.error}"
            self._finish(seq, "error")
            return SequenceUpdate.of(seq, None, error=message)
        seq.token_ids.append(token.token_id)
        decision = check_stop(seq, token.token_id, self.eos_token_ids, self.config.max_model_len)
        if decision is not None:
            self._finish(seq, decision.finish_reason, decision.stop_reason)
        return SequenceUpdate.of(seq, token)

    def _requeue_plan(self, seqs: list[Sequence]) -> list[SequenceUpdate]:
        """A node had no room for the plan and kept nothing of it: its sequences restart
        from scratch once there is room (preemption by recompute), nothing fails."""
        for seq in seqs:
            seq.in_flight_step = None
            if seq.is_finished:
                self._release(seq)
            elif seq.status is SequenceStatus.RUNNING:
                self._preempt(seq)
        return []

    def _replay_plan(self, seqs: list[Sequence], error: str) -> list[SequenceUpdate]:
        """A node on the plan's route failed (unreachable, late, refused, erred): its
        sequences start again on another route, unless they were replayed too often."""
        updates = []
        for seq in seqs:
            seq.in_flight_step = None
            if seq.is_finished:
                self._release(seq)
            elif seq.num_replays >= MAX_REPLAYS:
                message = f"{error} (after {seq.num_replays} replays on other routes)"
                updates += self._fail_plan([seq], message)
            else:
                self._replay(seq)
        return updates

    def _replay(self, seq: Sequence) -> None:
        seq.replay_pending = False
        self._unverified.pop(seq.seq_id, None)
        if seq.status is not SequenceStatus.RUNNING:
            return
        seq.num_replays += 1
        self._replayed.append(seq.seq_id)
        self.num_replayed_sequences += 1
        self.num_replayed_tokens += seq.num_tokens
        self.kv.free(seq.seq_id)
        seq.status = SequenceStatus.WAITING
        seq.num_computed_tokens = 0
        self._forget_on_stages(seq)  # frees what the surviving nodes of its route hold
        self._waiting.appendleft(seq)
        self._running_dirty = True

    def _fail_plan(self, seqs: list[Sequence], error: str) -> list[SequenceUpdate]:
        logger.error("step failed for %d sequences: %s", len(seqs), error)
        updates = []
        for seq in seqs:
            seq.in_flight_step = None
            if seq.is_finished:
                self._release(seq)
                continue
            self._finish(seq, "error")
            updates.append(SequenceUpdate.of(seq, None, error=error))
        return updates

    # -- finishing -----------------------------------------------------------------------

    def _finish(self, seq: Sequence, reason: str, stop_reason: int | str | None = None) -> None:
        """Mark finished; blocks are freed now, or when its in-flight plan comes back."""
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self._unverified.pop(seq.seq_id, None)
        self._running_dirty = True
        if seq.seq_index == 0:
            self._release_held_siblings(seq.request)
        if not seq.is_in_flight:
            self._release(seq)

    def _release(self, seq: Sequence) -> None:
        assert seq.is_finished and not seq.is_released
        seq.is_released = True
        self.kv.free(seq.seq_id)
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

    def _release_held_siblings(self, record: RequestRecord) -> None:
        if not record.held_siblings:
            return
        self._num_held_siblings -= len(record.held_siblings)
        self._waiting.extendleft(reversed(record.held_siblings))
        record.held_siblings = []

    def _prune_running(self) -> None:
        if self._running_dirty:
            self._running = [s for s in self._running if s.status is SequenceStatus.RUNNING]
            self._running_dirty = False
