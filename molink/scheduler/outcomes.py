"""Plan outcomes: what a plan's result, or its failure, does to the plan's sequences.

A result advances each sequence's computed count, registers its computed blocks in the
prefix cache and appends its sampled token (stopping the sequence when a stop condition
holds); a sequence the result owes a token and lacks one replays, as after a failed
plan (the last stage failing one sequence alone says so in the token's ``error``, and
that sequence fails). A failed plan's sequences are requeued (the node had no room:
``KV_FULL``; past ``MAX_ROOM_REFUSALS`` refusals the largest of them fails instead, so
a sequence no stage has room for cannot restart for ever), replayed on another route (the node was lost, late, refused or erred; after
``MAX_REPLAYS`` replays they fail instead, so a node that fails a sequence every time
cannot hold it forever), or failed (any other error).

A result may name sequences whose token awaits a spot check's verdict (``held_seq_ids``):
their KV counts as computed, but the token is held apart (by the lifecycle) and the
sequence is not scheduled until ``resolve_unverified`` says whether the token stands (it is
appended and reported then) or not (it is dropped and the sequence replays from its last
verified token).

``PlanOutcomes`` owns no state of its own: the plan comes from the scheduler's in-flight
registry, which the scheduler pops before handing it here, and every move of a sequence
between queues goes through its ``SequenceLifecycle`` (molink/scheduler/lifecycle.py).
It changes only the per-step fields of the sequences in the plan (``in_flight_step``,
``num_computed_tokens``, the appended token) and registers computed blocks with the KV
cache.
"""

from __future__ import annotations

import logging

from molink.kv_cache.manager import KVCacheManager
from molink.scheduler.in_flight import InFlightStep
from molink.scheduler.lifecycle import SequenceLifecycle, arrival_key
from molink.scheduler.sequence import Sequence, SequenceStatus, SequenceUpdate
from molink.scheduler.stop import check_stop
from molink.step import FailureKind, SampledToken, StepPlan, StepResult

logger = logging.getLogger(__name__)

# Failures after which a plan's sequences are replayed rather than failed.
REPLAYABLE = frozenset(
    {FailureKind.UNREACHABLE, FailureKind.DEADLINE, FailureKind.NODE_ERROR, FailureKind.REJECTED}
)
MAX_REPLAYS = 8
# Room refusals (KV_FULL) after which a sequence fails: a stage's room frees up as other
# sequences finish (the head waits FULL_COOLDOWN_S before sending it new ones), so this
# many refusals means the sequence is unlikely ever to fit; without a bound it would
# restart from scratch for ever.
MAX_ROOM_REFUSALS = 16


class PlanOutcomes:
    def __init__(
        self,
        lifecycle: SequenceLifecycle,
        kv: KVCacheManager,
        eos_token_ids: frozenset[int],
        max_model_len: int,
    ) -> None:
        self._lifecycle = lifecycle
        self._kv = kv
        self._eos_token_ids = eos_token_ids
        self._max_model_len = max_model_len

    def apply(self, step: InFlightStep, result: StepResult) -> list[SequenceUpdate]:
        """Apply the result of ``step``, just taken out of the in-flight registry. A result
        with ``error`` (or for another step) fails, requeues or replays its sequences."""
        sent_plan, seqs = step.plan, step.sequences
        error = result.error
        if error is None and result.step_id != sent_plan.step_id:
            error = f"result of step {result.step_id} given for step {sent_plan.step_id}"
        if error is not None and result.failure_kind is FailureKind.KV_FULL:
            updates = self._requeue_plan(seqs, error)
        elif error is not None and result.failure_kind in REPLAYABLE:
            updates = self._replay_plan(seqs, error)
        elif error is not None:
            updates = self._fail_plan(seqs, error)
        else:
            updates = self._apply_result(sent_plan, seqs, result)
        self._lifecycle.prune_running()
        return updates

    def _apply_result(
        self, plan: StepPlan, seqs: list[Sequence], result: StepResult
    ) -> list[SequenceUpdate]:
        lifecycle = self._lifecycle
        sampled = {token.seq_id: token for token in result.sampled}
        updates = []
        replays = []
        unserved: set[int] = set()  # owed a token that the last stage did not send
        for scheduled, seq in zip(plan.scheduled, seqs, strict=True):
            seq.in_flight_step = None
            if seq.is_finished:  # aborted or stopped while in flight
                lifecycle.release(seq)
                continue
            seq.num_computed_tokens += scheduled.num_new_tokens
            self._kv.register_computed(seq.seq_id, seq.token_ids, seq.num_computed_tokens)
            if seq.seq_index == 0 and seq.num_computed_tokens >= seq.num_prompt_tokens:
                lifecycle.release_held_siblings(seq.request)
            token = sampled.get(seq.seq_id)
            if scheduled.sample and token is not None:
                seq.num_room_refusals = 0  # the route had room for all of it
            if scheduled.sample and seq.seq_id in result.held_seq_ids and token is not None:
                if not seq.replay_pending:  # else its route lost a node: it replays without
                    lifecycle.hold_unverified(seq.seq_id, plan.step_id, token)
            elif scheduled.sample and token is None:
                # What the route holds of it is unknown: it starts again, as after a
                # failed step (and fails after MAX_REPLAYS, if every route does this).
                logger.warning(
                    "step %d brought no token for sequence %d; it replays",
                    plan.step_id,
                    seq.seq_id,
                )
                unserved.add(seq.seq_id)
                replays.append(seq)
                continue
            elif scheduled.sample:
                updates.append(self._accept_sample(seq, token))
            if seq.replay_pending and not seq.is_finished:
                replays.append(seq)
        # Newest first, each to the front of the queue: the oldest is admitted first again.
        for seq in sorted(replays, key=arrival_key, reverse=True):
            if seq.seq_id in unserved:
                message = f"the last stage sent no token for sequence {seq.seq_id}"
                updates += self._replay_plan([seq], message)
            else:
                lifecycle.replay_sequence(seq)
        return updates

    def resolve_unverified(self, seq_id: int, step_id: int, keep: bool) -> list[SequenceUpdate]:
        """The verdict on the token ``step_id`` sampled for ``seq_id``: kept (appended and
        reported, as a result would have) or dropped (the sequence replays from the tokens
        it has). Unknown, stale (the sequence restarted since) and finished ones are
        ignored."""
        lifecycle = self._lifecycle
        token = lifecycle.take_unverified(seq_id, step_id)
        if token is None:
            return []
        seq = lifecycle.get(seq_id)
        if seq is None or seq.status is not SequenceStatus.RUNNING:
            return []
        if not keep:
            lifecycle.replay_sequence(seq)
            lifecycle.prune_running()
            return []
        update = self._accept_sample(seq, token)
        lifecycle.prune_running()
        return [update]

    def _accept_sample(self, seq: Sequence, token: SampledToken) -> SequenceUpdate:
        if token.error is not None:
            message = f"sequence {seq.seq_id} failed on the last stage: {token.error}"
            self._lifecycle.finish(seq, "error")
            return SequenceUpdate.of(seq, None, error=message)
        seq.token_ids.append(token.token_id)
        decision = check_stop(seq, token.token_id, self._eos_token_ids, self._max_model_len)
        if decision is not None:
            self._lifecycle.finish(seq, decision.finish_reason, decision.stop_reason)
        return SequenceUpdate.of(seq, token)

    def _requeue_plan(self, seqs: list[Sequence], error: str) -> list[SequenceUpdate]:
        """A node had no room for the plan and kept nothing of it: its sequences restart
        from scratch once there is room (preemption by recompute). One refused more than
        ``MAX_ROOM_REFUSALS`` times fails instead (``_refused_too_often``)."""
        updates = []
        culprit = self._refused_too_often(seqs)
        # Newest first, each to the front of the queue: the oldest is admitted first again.
        for seq in sorted(seqs, key=arrival_key, reverse=True):
            if seq is culprit:
                message = (
                    f"{error} (no KV room for sequence {seq.seq_id} of {seq.num_tokens} "
                    f"tokens: refused {seq.num_room_refusals} times)"
                )
                updates += self._fail_plan([seq], message)
                continue
            seq.in_flight_step = None
            if seq.is_finished:
                self._lifecycle.release(seq)
            elif seq.status is SequenceStatus.RUNNING:
                self._lifecycle.preempt(seq)
        return updates

    @staticmethod
    def _refused_too_often(seqs: list[Sequence]) -> Sequence | None:
        """Counts a refusal against each running sequence of the plan (since its last
        token: the route had room for all of it then); returns the one to fail, if any
        went over the bound. A refusal does not say which sequence lacked
        room, so only one fails per refusal: the largest (the newest of equals), and the
        others' count starts again (their refusals are put down to it)."""
        running = [s for s in seqs if s.status is SequenceStatus.RUNNING and not s.is_finished]
        for seq in running:
            seq.num_room_refusals += 1
        over = [s for s in running if s.num_room_refusals > MAX_ROOM_REFUSALS]
        if not over:
            return None
        culprit = max(over, key=lambda s: (s.num_tokens, s.arrival_order))
        for seq in running:
            if seq is not culprit:
                seq.num_room_refusals = 0
        return culprit

    def _replay_plan(self, seqs: list[Sequence], error: str) -> list[SequenceUpdate]:
        """A node on the plan's route failed (unreachable, late, refused, erred): its
        sequences start again on another route, unless they were replayed too often."""
        updates = []
        # Newest first, each to the front of the queue: the oldest is admitted first again.
        for seq in sorted(seqs, key=arrival_key, reverse=True):
            seq.in_flight_step = None
            if seq.is_finished:
                self._lifecycle.release(seq)
            elif seq.num_replays >= MAX_REPLAYS:
                message = f"{error} (after {seq.num_replays} replays on other routes)"
                updates += self._fail_plan([seq], message)
            else:
                self._lifecycle.replay_sequence(seq)
        return updates

    def _fail_plan(self, seqs: list[Sequence], error: str) -> list[SequenceUpdate]:
        logger.error("step failed for %d sequences: %s", len(seqs), error)
        updates = []
        for seq in seqs:
            seq.in_flight_step = None
            if seq.is_finished:
                self._lifecycle.release(seq)
                continue
            self._lifecycle.finish(seq, "error")
            updates.append(SequenceUpdate.of(seq, None, error=error))
        return updates
