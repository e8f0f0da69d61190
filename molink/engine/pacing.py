"""What the head's engine passes to ``Scheduler.schedule`` for each micro-batch.

A ``StepPacer`` turns the engine's state (the scheduler, the plans in flight, how many
micro-batches there are) into ``ScheduleLimits``. The engine without a pacer (a single
node) schedules exactly as before; the pipeline head uses ``PipelinePacer``:

* ``prefill_token_budget`` from transmission scheduling (molink/engine/transmission.py),
  only while some sequence decodes: with no decode to protect, a cap would only delay
  the first tokens. The pacer remembers when each prefill got its first chunk, for the
  budget's aging;
* ``replay_token_budget`` from transmission scheduling too, while some sequence decodes:
  sequences moved off a lost node rebuild their KV a compute-bounded chunk per plan, so
  the streams still decoding keep getting tokens;
* ``max_decodes = ceil(running / K)`` with K micro-batches, so each plan carries its
  share of the decodes instead of the first free micro-batch taking them all and leaving
  the others empty (which would serialise the pipeline behind one plan).
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from typing import Protocol

from molink.engine.microbatch_controller import balanced_decode_cap
from molink.engine.transmission import TransmissionScheduler, prefill_tokens_of
from molink.scheduler.scheduler import Scheduler
from molink.step import StepPlan

# Weight of the newest plan in the running mean of tokens per plan.
_MEAN_WEIGHT = 0.1
# Prefill start times kept at most; beyond it (aborted prompts never finish) the oldest go.
_MAX_TRACKED_PREFILLS = 4096


@dataclass(frozen=True)
class ScheduleLimits:
    """The arguments of ``Scheduler.schedule`` that a pacer decides; None: no limit."""

    prefill_token_budget: int | None = None
    max_decodes: int | None = None
    replay_token_budget: int | None = None


class StepPacer(Protocol):
    """Decides each plan's limits; sees every non-empty plan the engine submits."""

    def limits(
        self, scheduler: Scheduler, in_flight: Collection[StepPlan], num_micro_batches: int
    ) -> ScheduleLimits: ...

    def observe(self, plan: StepPlan) -> None: ...


class PipelinePacer:
    """Prefill budget plus balanced decodes; keeps the mean tokens per plan it saw."""

    def __init__(self, transmission: TransmissionScheduler, balance_decodes: bool = True):
        self.transmission = transmission
        self.balance_decodes = balance_decodes
        self.mean_plan_tokens: float | None = None
        self._prefill_started: dict[int, float] = {}  # seq id -> first chunk's time

    def limits(
        self, scheduler: Scheduler, in_flight: Collection[StepPlan], num_micro_batches: int
    ) -> ScheduleLimits:
        max_decodes = None
        if self.balance_decodes:
            max_decodes = balanced_decode_cap(scheduler.num_running, num_micro_batches)
        prefill_budget = replay_budget = None
        if scheduler.num_decoding > 0:
            replay_budget = self.transmission.replay_budget(
                floor_tokens=scheduler.kv.block_size,
                token_budget=scheduler.config.max_num_batched_tokens,
            )
        if self.transmission.allowance is not None and scheduler.num_decoding > 0:
            prefill_budget = self.transmission.budget(
                in_flight_prefill_tokens=sum(prefill_tokens_of(plan) for plan in in_flight),
                prefill_started_at=self._oldest_start(scheduler.prefill_candidate_ids()),
                floor_tokens=scheduler.kv.block_size,
                token_budget=scheduler.config.max_num_batched_tokens,
            )
        return ScheduleLimits(prefill_budget, max_decodes, replay_budget)

    def _oldest_start(self, seq_ids: list[int]) -> float | None:
        starts = [self._prefill_started[i] for i in seq_ids if i in self._prefill_started]
        return min(starts, default=None)

    def _track_prefills(self, plan: StepPlan) -> None:
        now = self.transmission.clock()
        for seq in plan.scheduled:
            if seq.num_new_tokens <= 1:
                continue
            if seq.sample:  # the chunk ends the prompt: the prefill is done
                self._prefill_started.pop(seq.seq_id, None)
            else:
                self._prefill_started.setdefault(seq.seq_id, now)
        while len(self._prefill_started) > _MAX_TRACKED_PREFILLS:
            del self._prefill_started[next(iter(self._prefill_started))]

    def observe(self, plan: StepPlan) -> None:
        self._track_prefills(plan)
        tokens = float(plan.num_tokens)
        if self.mean_plan_tokens is None:
            self.mean_plan_tokens = tokens
        else:
            self.mean_plan_tokens += _MEAN_WEIGHT * (tokens - self.mean_plan_tokens)
