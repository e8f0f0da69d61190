"""Building one StepPlan: the budget, the diffs for the stages, and preemption victims."""

from __future__ import annotations

from collections.abc import Sequence as SequenceOf

from molink.errors import InvalidParameterError
from molink.scheduler.sequence import Sequence, SequenceStatus
from molink.step import NewSequenceData, ScheduledSequence, StepPlan


def check_step_limit(value: int | None, name: str) -> None:
    """A limit passed to ``Scheduler.schedule``: None (no limit) or a count >= 0."""
    if value is not None and value < 0:
        raise InvalidParameterError(name, "must be >= 0")


class PlanBuilder:
    """Tracks the budgets and the diffs the stages need (new data, new blocks).

    ``budget_left`` bounds every token; ``prefill_budget_left`` (None: unbounded) bounds
    prefill chunks as well; ``replay_budget_left`` (None: unbounded) bounds the chunks of
    sequences being replayed after a lost node as well; ``decodes_left`` (None: unbounded)
    caps decoding sequences.
    """

    def __init__(
        self,
        step_id: int,
        micro_batch: int,
        token_budget: int,
        prefill_token_budget: int | None = None,
        max_decodes: int | None = None,
        replay_token_budget: int | None = None,
    ) -> None:
        self.step_id = step_id
        self.micro_batch = micro_batch
        self.budget_left = token_budget
        self.prefill_budget_left = prefill_token_budget
        self.decodes_left = max_decodes
        self.replay_budget_left = replay_token_budget
        self.sequences: list[Sequence] = []
        self._scheduled: list[ScheduledSequence] = []
        self._token_ids: list[int] = []
        self._new_sequences: list[NewSequenceData] = []

    @property
    def decode_room(self) -> int:
        """1 while the plan can take one more decoding sequence, else 0."""
        return 1 if self.budget_left > 0 and self.decodes_left != 0 else 0

    @property
    def prefill_room(self) -> int:
        """How many prefill tokens the plan can still take."""
        if self.prefill_budget_left is None:
            return self.budget_left
        return min(self.budget_left, self.prefill_budget_left)

    def prefill_room_for(self, seq: Sequence) -> int:
        """How many prefill tokens of ``seq`` the plan can still take: a replayed
        sequence's chunk also draws on the replay budget."""
        if seq.num_replays == 0 or self.replay_budget_left is None:
            return self.prefill_room
        return min(self.prefill_room, self.replay_budget_left)

    def add(
        self,
        seq: Sequence,
        num_new_tokens: int,
        block_table: SequenceOf[int],
        is_decode: bool = False,
    ) -> None:
        """Schedule ``num_new_tokens`` of ``seq`` starting at its ``num_computed_tokens``;
        a prefill chunk (``is_decode`` False) draws on the prefill budget too."""
        assert 0 < num_new_tokens <= (self.budget_left if is_decode else self.prefill_room_for(seq))
        if is_decode and self.decodes_left is not None:
            self.decodes_left -= 1
        elif not is_decode and self.prefill_budget_left is not None:
            self.prefill_budget_left -= num_new_tokens
        if not is_decode and seq.num_replays and self.replay_budget_left is not None:
            self.replay_budget_left -= num_new_tokens
        start = seq.num_computed_tokens
        end = start + num_new_tokens
        num_tokens = len(seq.token_ids)
        assert end <= num_tokens
        if not seq.known_to_stages:
            self._new_sequences.append(
                NewSequenceData(
                    seq_id=seq.seq_id,
                    token_ids=tuple(seq.token_ids),
                    num_prompt_tokens=seq.num_prompt_tokens,
                    sampling=seq.params,
                )
            )
            seq.known_to_stages = True
            seq.num_blocks_sent = 0
            seq.sent_in_step = self.step_id
        new_block_ids = tuple(block_table[seq.num_blocks_sent :])
        seq.num_blocks_sent = len(block_table)
        self._scheduled.append(
            ScheduledSequence(
                seq_id=seq.seq_id,
                num_computed_tokens=start,
                num_new_tokens=num_new_tokens,
                new_block_ids=new_block_ids,
                sample=end == num_tokens,
            )
        )
        self._token_ids.extend(seq.token_ids[start:end])
        self.budget_left -= num_new_tokens
        seq.in_flight_step = self.step_id
        self.sequences.append(seq)

    def build(self, finished_seq_ids: list[int]) -> StepPlan:
        return StepPlan(
            step_id=self.step_id,
            scheduled=tuple(self._scheduled),
            token_ids=tuple(self._token_ids),
            new_sequences=tuple(self._new_sequences),
            finished_seq_ids=tuple(finished_seq_ids),
            micro_batch=self.micro_batch,
        )


class VictimCursor:
    """Walks the running list from its newest end; each entry is passed at most once per
    ``schedule`` call because whatever it skips stays ineligible for the rest of the call."""

    def __init__(self, running: SequenceOf[Sequence]) -> None:
        self._running = running
        self._position = len(running) - 1
        self.num_preempted = 0

    def next_victim(self, newer_than_index: int) -> Sequence | None:
        while self._position > newer_than_index:
            candidate = self._running[self._position]
            self._position -= 1
            if candidate.status is SequenceStatus.RUNNING and not candidate.is_in_flight:
                self.num_preempted += 1
                return candidate
        return None
