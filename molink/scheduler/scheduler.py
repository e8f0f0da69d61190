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

A node that loses a sequence's KV makes it replay: like a preemption it restarts from
zero at the front of the waiting queue, and the head sends it to another route (see
``molink/scheduler/outcomes.py`` for replays after a failed plan and for tokens held until
a spot check's verdict).

The scheduler is three parts, each the one owner of its state:

* ``Scheduler`` (here): the scheduling pass, the in-flight registry (``InFlightPlans``:
  ``schedule`` adds, ``update`` takes back, ``fail_all`` forgets), the step-id counter and
  the prefix-cache counters; it holds the ``KVCacheManager`` it is given and alone
  allocates blocks. Its public methods are the scheduler's whole interface.
* ``SequenceLifecycle`` (molink/scheduler/lifecycle.py): request records, the waiting
  queue, the running list, held siblings, releases due to the stages, the replay queue,
  tokens awaiting a verdict; it alone frees blocks.
* ``PlanOutcomes`` (molink/scheduler/outcomes.py): applying a plan's result or failure; it
  keeps nothing between calls.

Cost per call: O(running) plus the work for what is scheduled; no scans of the waiting
queue beyond its head.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from molink.config import SchedulerConfig
from molink.errors import InvalidParameterError
from molink.kv_cache.manager import KVCacheManager
from molink.sampling_params import SamplingParams
from molink.scheduler.in_flight import InFlightPlans, InFlightView
from molink.scheduler.integrity import check_scheduler_integrity
from molink.scheduler.lifecycle import SequenceLifecycle
from molink.scheduler.outcomes import MAX_REPLAYS as MAX_REPLAYS  # re-exported for callers
from molink.scheduler.outcomes import PlanOutcomes
from molink.scheduler.plan_builder import PlanBuilder, VictimCursor, check_step_limit
from molink.scheduler.queues import num_decoding, prefill_candidates
from molink.scheduler.sequence import Sequence, SequenceStatus, SequenceTokens, SequenceUpdate
from molink.scheduler.validation import max_output_tokens_for
from molink.step import StepPlan, StepResult

logger = logging.getLogger(__name__)


# (sequence id, tokens it will hold after this step, or for a sequence not yet admitted the
# most it may ever hold) -> may it join this plan? The head's
# router uses it to keep each plan on one route (molink/engine/routing.py).
SequenceFilter = Callable[[int, int], bool]


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
        self._lifecycle = SequenceLifecycle(kv)
        self._outcomes = PlanOutcomes(
            self._lifecycle, kv, self.eos_token_ids, scheduler_config.max_model_len
        )
        # The one registry of plans in flight; the engine reads it, only this class writes.
        self._in_flight = InFlightPlans()
        self._next_step_id = 0
        # Counters since start, for metrics.
        self.prefix_cache_queries = 0  # tokens of admitted sequences looked up
        self.prefix_cache_hits = 0  # of those, tokens found in the cache

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
        if self._lifecycle.record(request_id) is not None:
            raise InvalidParameterError("request_id", f"{request_id!r} is already queued")
        max_output = max_output_tokens_for(
            prompt_token_ids,
            params,
            self.config.max_model_len,
            self.kv.num_total_blocks,
            self.kv.block_size,
        )
        record = self._lifecycle.add_request(
            request_id, prompt_token_ids, params, arrival_time, max_output
        )
        return [seq.seq_id for seq in record.sequences]

    def abort_request(self, request_id: str) -> None:
        """Finish every unfinished sequence of the request with reason "abort"."""
        self._lifecycle.abort_request(request_id)

    def finish_sequence(
        self, seq_id: int, reason: str, stop_reason: int | str | None = None
    ) -> None:
        """End one sequence from outside (e.g. a stop string matched); no-op if finished."""
        self._lifecycle.finish_sequence(seq_id, reason, stop_reason)

    def fail_all(self, reason: str) -> list[SequenceUpdate]:
        """The pipeline is gone: fail every sequence, free every block, forget in-flight
        plans (a late result for one is ignored) and the prefix cache."""
        self._in_flight.clear()
        updates = self._lifecycle.fail_all(reason)
        self.kv.reset_prefix_cache()
        logger.error("failed %d sequences: %s", len(updates), reason)
        return updates

    def replay(self, seq_ids: list[int], before_step: int | None = None) -> None:
        """Their KV was lost with a node: send them again from scratch on another route
        (those in flight once their plan comes back). Unknown or finished ids are ignored,
        and so are sequences whose copy was first sent in step ``before_step`` or later
        (placed after the loss; None: no such bound)."""
        self._lifecycle.replay(seq_ids, before_step)

    def take_replayed(self) -> list[int]:
        """The sequences replayed since the last call (to time their recovery)."""
        return self._lifecycle.take_replayed()

    # -- lookups -------------------------------------------------------------------------

    def get_sequence(self, seq_id: int) -> Sequence | None:
        """A live sequence (read only). Forgotten once every sequence of its request is
        finished and freed."""
        return self._lifecycle.get(seq_id)

    def request_tokens(self, request_id: str) -> list[SequenceTokens]:
        """Read access to the tokens of a queued request's sequences (index i is sequence
        i; empty for an unknown request). The references stay valid, and keep following
        each sequence, after the scheduler forgets the request."""
        record = self._lifecycle.record(request_id)
        return [] if record is None else list(record.sequences)

    def request_id_of(self, seq_id: int) -> str | None:
        seq = self._lifecycle.get(seq_id)
        return None if seq is None else seq.request_id

    def seq_ids_of(self, request_id: str) -> list[int]:
        record = self._lifecycle.record(request_id)
        return [] if record is None else [seq.seq_id for seq in record.sequences]

    def has_unfinished(self) -> bool:
        return self._lifecycle.has_unfinished()

    @property
    def num_running(self) -> int:
        return len(self._lifecycle.running)

    @property
    def num_waiting(self) -> int:
        return self._lifecycle.num_waiting

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
        return num_decoding(self._lifecycle.running)

    @property
    def num_unverified(self) -> int:
        """Sequences whose last token awaits a spot check's verdict."""
        return self._lifecycle.num_unverified

    @property
    def num_preemptions(self) -> int:
        return self._lifecycle.num_preemptions

    @property
    def num_replayed_sequences(self) -> int:
        return self._lifecycle.num_replayed_sequences

    @property
    def num_replayed_tokens(self) -> int:
        """Tokens the replays must compute again."""
        return self._lifecycle.num_replayed_tokens

    def prefill_candidate_ids(self) -> list[int]:
        """Sequence ids of ``molink.scheduler.queues.prefill_candidates``."""
        lifecycle = self._lifecycle
        return [seq.seq_id for seq in prefill_candidates(lifecycle.running, lifecycle.waiting)]

    def check_integrity(self) -> None:
        """Raise (KVCacheIntegrityError, SchedulerIntegrityError) if an invariant broke."""
        self.kv.check_integrity()
        lifecycle = self._lifecycle
        check_scheduler_integrity(
            lifecycle.running,
            lifecycle.waiting,
            self._in_flight,
            lifecycle.sequences,
            self.kv,
            self.config.max_num_seqs,
            lifecycle.unverified_ids(),
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
        lifecycle = self._lifecycle
        # Preemption only marks the running list; it is pruned once both passes are done,
        # so the passes and the victim cursor walk one unchanging list.
        victims = VictimCursor(lifecycle.running)
        self._schedule_running(builder, victims, True, accepts)
        self._schedule_running(builder, victims, False, accepts)
        lifecycle.prune_running()
        if victims.num_preempted == 0:
            self._admit_waiting(builder, accepts)
        plan = builder.build(lifecycle.take_pending_finished())
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
        is_unverified = self._lifecycle.is_unverified
        for index, seq in enumerate(self._lifecycle.running):
            room = builder.decode_room if decodes else builder.prefill_room
            if room == 0:
                return
            if seq.status is not running_status or seq.in_flight_step is not None:
                continue
            if is_unverified(seq.seq_id):  # its next input is its unverified token
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
            self._lifecycle.preempt(victim)
        return True

    def _admit_waiting(self, builder: PlanBuilder, accepts: SequenceFilter | None) -> None:
        lifecycle = self._lifecycle
        waiting = lifecycle.waiting
        while (
            waiting
            and builder.prefill_room > 0
            and len(lifecycle.running) < self.config.max_num_seqs
        ):
            seq = waiting[0]
            if lifecycle.is_release_pending(seq.seq_id):
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
            lifecycle.admit(seq, hit.num_tokens)
            self.prefix_cache_queries += seq.num_tokens
            self.prefix_cache_hits += hit.num_tokens
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
        step = self._in_flight.pop(plan.step_id)
        if step is None:
            if not plan.is_empty:
                logger.warning("update for step %d, which is not in flight; ignored", plan.step_id)
            return []
        return self._outcomes.apply(step, result)

    def resolve_unverified(self, seq_id: int, step_id: int, keep: bool) -> list[SequenceUpdate]:
        """The verdict on the token ``step_id`` sampled for ``seq_id``: kept (appended and
        reported, as ``update`` would have) or dropped (the sequence replays from the
        tokens it has). Unknown, stale (the sequence restarted since) and finished ones
        are ignored."""
        return self._outcomes.resolve_unverified(seq_id, step_id, keep)
