"""The head's loop: schedule -> run the pipeline -> update -> emit.

With K micro-batches in flight the engine keeps up to K plans outstanding and schedules a
micro-batch's next step as soon as its tokens come back; a single node runs K = 1 and its
executor computes synchronously inside ``submit``. A pipeline head also has a pacer
(molink/engine/pacing.py) that bounds each plan's prefill tokens and decodes.
"""

from __future__ import annotations

import logging
import time

from molink.engine.executor import PlanExecutor
from molink.engine.pacing import StepPacer
from molink.engine.recovery import RecoverySource, VerdictSource
from molink.engine.request_state import RequestState
from molink.engine.routing import PlanRouter, RouteChoice
from molink.errors import InvalidParameterError
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams
from molink.scheduler.scheduler import Scheduler
from molink.scheduler.validation import check_prompt_token_ids, check_sampled_tokens
from molink.step import StepPlan, StepResult
from molink.tokenizer.protocol import TokenizerLike

logger = logging.getLogger(__name__)


class LLMEngine:
    def __init__(
        self,
        scheduler: Scheduler,
        executor: PlanExecutor,
        tokenizer: TokenizerLike,
        num_micro_batches: int = 1,
        pacer: StepPacer | None = None,
        router: PlanRouter | None = None,
        recovery: RecoverySource | None = None,
        vocab_size: int | None = None,
    ) -> None:
        if num_micro_batches < 1:
            raise InvalidParameterError("num_micro_batches", "must be >= 1")
        self.scheduler = scheduler
        self.executor = executor
        self.tokenizer = tokenizer
        # The rows of the model's embedding (None: the ids the tokenizer has): a prompt's
        # token ids must each have one.
        self.vocab_size = vocab_size or tokenizer.vocab_size
        self.num_micro_batches = num_micro_batches
        self.pacer = pacer  # None: plans take the scheduler's own limits
        self.router = router  # None: one route (or one process) takes every plan
        self.recovery = recovery  # None: nothing can be lost (one process)
        # A head with spot checks holds checked sequences' tokens until their verdicts.
        self._verdicts = recovery if isinstance(recovery, VerdictSource) else None
        # Replayed sequence -> when the failure that moved it was noticed, until its next token.
        self._replayed_at: dict[int, float] = {}
        # Sequence in flight when its node was lost -> when that was noticed, until its plan
        # comes back and it replays (then it moves to _replayed_at) or ends.
        self._failed_at: dict[int, float] = {}
        self._replays_counted = (0, 0)  # the scheduler's (sequences, tokens) already counted
        self._requests: dict[str, RequestState] = {}
        # The scheduler's registry of plans in flight (read here, never written).
        self._plans = scheduler.in_flight
        self.num_steps = 0
        # The last fill left a slot free because nothing could be scheduled.
        self.nothing_to_schedule = False

    # -- requests -----------------------------------------------------------------------

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self._requests:
            raise InvalidParameterError("request_id", f"{request_id!r} is already running")
        check_prompt_token_ids(prompt_token_ids, self.vocab_size)
        arrival_time = arrival_time or time.monotonic()
        self.scheduler.add_request(request_id, prompt_token_ids, params, arrival_time)
        try:
            sequences = self.scheduler.request_tokens(request_id)
            state = RequestState.create(request_id, sequences, params, self.tokenizer, arrival_time)
        except Exception:
            self.scheduler.abort_request(request_id)  # nothing of it may stay behind
            raise
        self._requests[request_id] = state

    def abort_request(self, request_id: str) -> RequestOutput | None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.abort_request(request_id)
        for seq_id in state.seq_ids:
            self._replayed_at.pop(seq_id, None)
            self._failed_at.pop(seq_id, None)
        for out in state.outputs:
            if out.finish_reason is None:
                out.finish_reason = "abort"
        return state.snapshot()

    def fail_all(self, message: str, status: int | None = None) -> list[RequestOutput]:
        """Fail every request (the pipeline is broken); frees every block and forgets the
        plans in flight (their results, if any still come, are ignored). ``status``: the
        HTTP status the error maps to (503 when no node serves some layers)."""
        updates = self.scheduler.fail_all(message)
        if updates:  # whatever a node of theirs still holds (the head's own stage at least)
            try:
                self.executor.release([u.seq_id for u in updates])
            except Exception:  # the stages' leases free them anyway
                logger.warning("releasing %d failed sequences failed", len(updates), exc_info=True)
        self._replayed_at.clear()
        self._failed_at.clear()
        outputs = []
        for request_id in list(self._requests):
            state = self._requests.pop(request_id)
            for out in state.outputs:
                if out.finish_reason is None:
                    out.finish_reason = "error"
                    out.error = message
                    out.error_status = status
            outputs.append(state.snapshot())
        return outputs

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or len(self._plans) > 0

    def set_num_micro_batches(self, num_micro_batches: int) -> None:
        """Change how many plans may be in flight; slots in use drain naturally."""
        if num_micro_batches < 1:
            raise InvalidParameterError("num_micro_batches", "must be >= 1")
        self.num_micro_batches = num_micro_batches

    @property
    def num_in_flight(self) -> int:
        return len(self._plans)

    # -- the loop -----------------------------------------------------------------------

    def step(self, poll_timeout: float = 0.0, finished_only: bool = False) -> list[RequestOutput]:
        """Fill free micro-batch slots, collect what came back, and emit outputs.

        ``finished_only``: emit only requests that finished (vLLM's ``FINAL_ONLY`` output
        kind, what ``LLM.generate`` asks for): an unfinished request is not copied out on
        every step, and its first output then carries every token as its delta."""
        self._recover()
        now = time.monotonic()
        touched = self._take_verdicts(now)
        self._fill_pipeline()
        in_flight = self._plans
        if not len(in_flight) and not self.scheduler.num_unverified:
            return self._emit_all(touched, finished_only)
        results = self.executor.poll(poll_timeout)  # with nothing in flight: a short wait
        now = time.monotonic()
        for result in results:
            plan = in_flight.plan(result.step_id)
            if plan is None:
                logger.warning("result for unknown step %d ignored", result.step_id)
                continue
            if result.error:
                logger.warning(
                    "step %d failed (%s): %s",
                    result.step_id,
                    result.failure_kind.name,
                    result.error,
                )
            result = check_sampled_tokens(result, self.vocab_size)
            served = served_route(result)
            for update in self.scheduler.update(plan, result):
                state = self._requests.get(update.request_id)
                if state is not None:
                    self._apply_update_isolated(state, update, now, result.error)
                    if served:
                        state.route = served
                    touched[state.request_id] = state
        self._count_replays()
        return self._emit_all(touched, finished_only)

    def _take_verdicts(self, now: float) -> dict[str, RequestState]:
        """Held tokens that stand reach their requests now; the others are dropped."""
        touched: dict[str, RequestState] = {}
        for verdict in self._verdicts.take_verdicts() if self._verdicts is not None else []:
            updates = self.scheduler.resolve_unverified(
                verdict.seq_id, verdict.step_id, verdict.keep
            )
            for update in updates:
                state = self._requests.get(update.request_id)
                if state is not None:
                    self._apply_update_isolated(state, update, now, None)
                    touched[state.request_id] = state
        return touched

    def _recover(self) -> None:
        """Sequences whose KV was on a lost node go back to be prefilled on another route."""
        if self.recovery is None:
            return
        self._count_replays()  # replays before these failures are timed from now
        for failure in self.recovery.take_failures():
            self.scheduler.replay(list(failure.seq_ids), failure.before_step)
            # Only the sequences that replay have a recovery to time: those moved now, and
            # those in flight once their plan comes back (finished, waiting or unknown
            # ones replay nothing).
            for seq_id in self.scheduler.take_replayed():
                self._replayed_at.setdefault(seq_id, failure.detected_at)
            for seq_id in failure.seq_ids:
                seq = self.scheduler.get_sequence(seq_id)
                if seq is not None and seq.replay_pending and not seq.is_finished:
                    self._failed_at.setdefault(seq_id, failure.detected_at)
        self._count_replays()

    def _count_replays(self) -> None:
        if self.recovery is None:
            return
        now_s = time.monotonic()
        for seq_id in self.scheduler.take_replayed():  # e.g. after a plan failed on its route
            self._replayed_at.setdefault(seq_id, self._failed_at.pop(seq_id, now_s))
        # Those that will not replay after all (their plan came back refused for room: they
        # restart as a preemption) keep no failure time for a later replay to be timed from.
        for seq_id in [s for s in self._failed_at if not self._replay_pending(s)]:
            del self._failed_at[seq_id]
        now = (self.scheduler.num_replayed_sequences, self.scheduler.num_replayed_tokens)
        if now != self._replays_counted:
            sequences, tokens = (a - b for a, b in zip(now, self._replays_counted, strict=True))
            self.recovery.recovery_stats().note_replayed(sequences, tokens)
            self._replays_counted = now

    def _replay_pending(self, seq_id: int) -> bool:
        seq = self.scheduler.get_sequence(seq_id)
        return seq is not None and seq.replay_pending and not seq.is_finished

    def _fill_pipeline(self) -> None:
        self.nothing_to_schedule = False
        while (micro_batch := self._plans.free_micro_batch(self.num_micro_batches)) is not None:
            plan = self._schedule_routed(micro_batch)
            if plan is None:
                self.nothing_to_schedule = True
                return
            self._mark_scheduled(plan)
            self.num_steps += 1
            self.executor.submit(plan)

    def _schedule_routed(self, micro_batch: int) -> StepPlan | None:
        """The next plan (None: nothing to schedule); with a router, on the first route
        choice that yields one. Empty plans only release what they carry."""
        choices: list[RouteChoice | None] = [None] if self.router is None else self.router.choices()
        for choice in choices:
            plan = self._schedule(micro_batch, choice)
            if not plan.is_empty:
                if self.router is not None and choice is not None:
                    self.router.bind(plan, choice)
                return plan
            if plan.finished_seq_ids:
                self.executor.release(list(plan.finished_seq_ids))
        return None

    def _schedule(self, micro_batch: int, choice: RouteChoice | None) -> StepPlan:
        accepts = None if choice is None else choice.accepts
        if self.pacer is None:
            return self.scheduler.schedule(micro_batch=micro_batch, accepts=accepts)
        in_flight = self._plans.plans()
        limits = self.pacer.limits(self.scheduler, in_flight, self.num_micro_batches)
        plan = self.scheduler.schedule(
            micro_batch=micro_batch,
            prefill_token_budget=limits.prefill_token_budget,
            max_decodes=limits.max_decodes,
            accepts=accepts,
            replay_token_budget=limits.replay_token_budget,
        )
        if not plan.is_empty:
            self.pacer.observe(plan)
        return plan

    def _mark_scheduled(self, plan: StepPlan) -> None:
        now = time.monotonic()
        for new_seq in plan.new_sequences:
            request_id = self.scheduler.request_id_of(new_seq.seq_id)
            state = self._requests.get(request_id) if request_id else None
            if state is not None and state.metrics.first_scheduled_time is None:
                state.metrics.first_scheduled_time = now

    def _apply_update_isolated(
        self, state: RequestState, update, now: float, error: str | None
    ) -> None:
        """Applies one sequence's update; if that fails (detokenizing, stop strings), the
        sequence ends with an error and the other sequences of the step go on."""
        try:
            self._apply_update(state, update, now, error)
        except Exception as exc:
            logger.exception("sequence %d failed on the head", update.seq_id)
            self.scheduler.finish_sequence(update.seq_id, "error")
            out = state.outputs[update.seq_index]
            if not out.finished:
                out.finish_reason = "error"
                out.error = f"the server failed on this sequence: {exc}"
            if state.finished:
                state.metrics.finished_time = now

    def _apply_update(self, state: RequestState, update, now: float, error: str | None) -> None:
        out = state.outputs[update.seq_index]
        if out.finished:
            return
        if update.new_token_id is not None:
            self._append_token(state, update, now, _emits_text(state, update))
        if update.finish_reason is not None and not out.finished:
            out.finish_reason = update.finish_reason
            out.stop_reason = update.stop_reason
            if update.finish_reason == "error":
                out.error = update.error or error or "the pipeline failed"
            else:
                detokenizer = state.detokenizers[update.seq_index]
                out.delta_text += detokenizer.flush().delta_text
                out.text = detokenizer.text
        if state.finished:
            state.metrics.finished_time = now

    def _append_token(self, state: RequestState, update, now: float, emit_text: bool) -> None:
        out = state.outputs[update.seq_index]
        sampled = update.sampled  # its token is already in the sequence's tokens
        if sampled.prompt_logprobs and state.prompt_logprobs is None:
            state.prompt_logprobs = list(sampled.prompt_logprobs)
        if out.logprobs is not None and sampled.logprob is not None:
            out.logprobs.append(sampled.logprob)
            out.top_logprobs.append(list(sampled.top_logprobs))
        if state.metrics.first_token_time is None:
            state.metrics.first_token_time = now
        failed_at = self._replayed_at.pop(update.seq_id, None)
        if failed_at is not None and self.recovery is not None:
            self.recovery.recovery_stats().observe_recovery(now - failed_at)
        if not emit_text:
            return
        step = state.detokenizers[update.seq_index].add_token(sampled.token_id)
        out.text = state.detokenizers[update.seq_index].text
        out.delta_text += step.delta_text
        # A stop string wins over the length limit reached by the same token (as in vLLM);
        # finishing an already finished sequence is a no-op.
        if step.stop_string is not None and update.finish_reason in (None, "length"):
            self.scheduler.finish_sequence(update.seq_id, "stop", step.stop_string)
            out.finish_reason = "stop"
            out.stop_reason = step.stop_string

    def _emit_all(
        self, touched: dict[str, RequestState], finished_only: bool
    ) -> list[RequestOutput]:
        states = touched.values()
        if finished_only:
            return [self._emit(state) for state in states if state.finished]
        return [self._emit(state) for state in states]

    def _emit(self, state: RequestState) -> RequestOutput:
        output = state.snapshot()
        if output.finished:
            self._requests.pop(state.request_id, None)
            for seq_id in state.seq_ids:
                self._replayed_at.pop(seq_id, None)
                self._failed_at.pop(seq_id, None)
        return output


def served_route(result: StepResult) -> tuple[str, ...]:
    """The nodes that computed a step, in order: its trace's hops (a pipeline's stages
    each add one); empty for a failed step or a single process."""
    if result.error:
        return ()
    return tuple(result.stage_timings)


def _emits_text(state: RequestState, update) -> bool:
    """The EOS or stop token a sequence ends on is not part of its text (as in vLLM),
    unless the request asks for the stop text in its output."""
    if update.finish_reason != "stop" or not isinstance(update.stop_reason, int | None):
        return True
    return state.params.include_stop_str_in_output
