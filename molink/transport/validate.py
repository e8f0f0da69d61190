"""Checks a stage runs on every plan a peer sends, before any of it reaches the executor.

Each violation raises ProtocolError with a message naming the step and what is wrong, so
that the head can report it and the stage can go on serving.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from molink.errors import ProtocolError
from molink.limits import LIMITS
from molink.step import StepPlan
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb


@dataclass(frozen=True)
class PlanLimits:
    """What a plan may ask of this stage."""

    vocab_size: int  # token ids must be in [0, vocab_size)
    num_kv_blocks: int = 0  # block ids must be below it; 0: not checked
    max_seqs_per_step: int = 4096
    max_tokens_per_step: int = 1 << 20
    max_tokens_per_sequence: int = 1 << 20
    max_blocks_per_step: int = 1 << 20
    max_stop_strings: int = 64

    @classmethod
    def from_config(
        cls, config: TransportConfig, vocab_size: int, num_kv_blocks: int = 0
    ) -> PlanLimits:
        return cls(
            vocab_size=vocab_size,
            num_kv_blocks=num_kv_blocks,
            max_seqs_per_step=config.max_seqs_per_step,
            max_tokens_per_step=config.max_tokens_per_step,
            max_tokens_per_sequence=config.max_tokens_per_sequence,
            max_blocks_per_step=config.max_blocks_per_step,
            max_stop_strings=config.max_stop_strings,
        )


def check_plan_message(msg: pb.StepPlan, limits: PlanLimits) -> None:
    """The counts of a received plan, read off the message before a single object is built
    from it: each id in a repeated field becomes a Python object several times its wire
    size, so a plan over the limits is refused first. ``validate_plan`` checks the rest."""
    where = f"step {msg.step_id} (micro-batch {msg.micro_batch})"
    seqs = limits.max_seqs_per_step
    _at_most(len(msg.scheduled), seqs, f"{where}: scheduled sequences")
    _at_most(len(msg.new_sequences), seqs, f"{where}: new sequences")
    _at_most(len(msg.finished_seq_ids), seqs, f"{where}: finished ids")
    _at_most(len(msg.witness.seq_ids), seqs, f"{where}: witnessed sequences")
    _at_most(len(msg.token_ids), limits.max_tokens_per_step, f"{where}: token ids")
    num_blocks = sum(len(s.new_block_ids) for s in msg.scheduled)
    _at_most(num_blocks, limits.max_blocks_per_step, f"{where}: new block ids")
    for new in msg.new_sequences:
        what = f"{where}: new sequence {new.seq_id}"
        _at_most(len(new.token_ids), limits.max_tokens_per_sequence, f"{what}: tokens")
        sampling = new.sampling
        _at_most(len(sampling.stop), limits.max_stop_strings, f"{what}: stop strings")
        _at_most(len(sampling.stop_token_ids), LIMITS.max_stop_token_ids, f"{what}: stop token ids")
        _at_most(len(sampling.logit_bias), LIMITS.max_logit_bias_entries, f"{what}: logit bias")
        _at_most(
            len(sampling.allowed_token_ids),
            LIMITS.max_allowed_token_ids,
            f"{what}: allowed token ids",
        )
        _at_most(len(sampling.bad_words), LIMITS.max_bad_word_sequences, f"{what}: bad words")
        for bad in sampling.bad_words:
            _at_most(len(bad.token_ids), LIMITS.max_bad_word_tokens, f"{what}: a bad word's ids")


def validate_plan(plan: StepPlan, limits: PlanLimits) -> None:
    """Everything that can be checked without the stage's sequence state."""
    where = f"step {plan.step_id} (micro-batch {plan.micro_batch})"
    _check_counts(plan, limits, where)
    _check_scheduled(plan, limits, where)
    _check_new_sequences(plan, limits, where)


def check_known_sequences(plan: StepPlan, known: Collection[int]) -> None:
    """Every scheduled sequence must be known to the stage or introduced by this plan."""
    introduced = {n.seq_id for n in plan.new_sequences}
    unknown = [
        s.seq_id for s in plan.scheduled if s.seq_id not in known and s.seq_id not in introduced
    ]
    if unknown:
        shown = ", ".join(str(i) for i in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ProtocolError(
            f"step {plan.step_id} (micro-batch {plan.micro_batch}) schedules sequences this "
            f"stage never received: {shown}"
        )


# A release leaves a node in chunks of at most this many sequences: a stage refuses a
# release naming more than its own max_sequences_per_head, which may be smaller than the
# sender's. Every stage accepts a chunk, whatever its bound (check_release_size).
RELEASE_CHUNK_SEQUENCES = 64


def release_chunks(seq_ids: Sequence[int]) -> list[tuple[int, ...]]:
    """``seq_ids`` in order, cut into chunks a stage accepts one release at a time."""
    ids = tuple(seq_ids)
    step = RELEASE_CHUNK_SEQUENCES
    return [ids[i : i + step] for i in range(0, len(ids), step)]


def check_release_size(num_seq_ids: int, max_sequences_per_head: int, where: str) -> None:
    """A release names at most ``max_sequences_per_head`` sequences, or one chunk when
    that is more: no head holds more on a stage, so an honest release never names more,
    and a longer list would only make the compute thread walk ids a peer chose. A chunk
    is always accepted: a head sends its releases in chunks without knowing each stage's
    bound (a stage below RELEASE_CHUNK_SEQUENCES would free nothing), and a bound meant
    for the sequences a head holds has no reason to cap how many it lets go."""
    limit = max(max_sequences_per_head, RELEASE_CHUNK_SEQUENCES)
    if num_seq_ids > limit:
        raise ProtocolError(
            f"{where}: seq_ids names {num_seq_ids} sequences, over the limit of {limit} "
            f"(max_sequences_per_head, or {RELEASE_CHUNK_SEQUENCES} when it is smaller)"
        )


def result_problem(result: pb.StepResult, config: TransportConfig, max_hops: int) -> str | None:
    """Why ``result`` holds more than any step can produce (None: it does not): more
    sampled tokens than a plan may schedule sequences, more prompt logprob entries than
    a plan may carry tokens, more alternatives for a token than a request may ask for,
    more trace entries than a route has hops (``max_hops``: a route has at most one per
    layer). Checked on the message, before a single object is built from it: the last
    node of a route could otherwise make the head build millions from one result."""
    if len(result.trace) > max_hops:
        return f"{len(result.trace)} trace entries, more than a route's {max_hops} hops at most"
    if len(result.sampled) > config.max_seqs_per_step:
        return (
            f"{len(result.sampled)} sampled tokens, over the limit of "
            f"{config.max_seqs_per_step} (max_seqs_per_step)"
        )
    prompt_entries = 0
    for token in result.sampled:
        if len(token.top_logprobs) > LIMITS.max_logprobs:
            return (
                f"{len(token.top_logprobs)} alternatives for the token of sequence "
                f"{token.seq_id}, over the limit of {LIMITS.max_logprobs} (logprobs)"
            )
        prompt_entries += len(token.prompt_logprobs)
        if prompt_entries > config.max_tokens_per_step:
            return (
                f"{prompt_entries} prompt logprob entries, over the limit of "
                f"{config.max_tokens_per_step} (max_tokens_per_step)"
            )
        for entry in token.prompt_logprobs:
            if len(entry.top) > LIMITS.max_prompt_logprobs:
                return (
                    f"{len(entry.top)} alternatives for a prompt token of sequence "
                    f"{token.seq_id}, over the limit of {LIMITS.max_prompt_logprobs} "
                    "(prompt_logprobs)"
                )
    return None


def _check_counts(plan: StepPlan, limits: PlanLimits, where: str) -> None:
    _at_most(len(plan.scheduled), limits.max_seqs_per_step, f"{where}: scheduled sequences")
    _at_most(len(plan.new_sequences), limits.max_seqs_per_step, f"{where}: new sequences")
    _at_most(len(plan.finished_seq_ids), limits.max_seqs_per_step, f"{where}: finished ids")
    witnessed = len(plan.witness_seq_ids or ())
    _at_most(witnessed, limits.max_seqs_per_step, f"{where}: witnessed sequences")
    _at_most(plan.num_tokens, limits.max_tokens_per_step, f"{where}: tokens")
    num_blocks = sum(len(s.new_block_ids) for s in plan.scheduled)
    _at_most(num_blocks, limits.max_blocks_per_step, f"{where}: new block ids")
    # Stages after the first receive no flat token ids (they do not read them).
    if plan.token_ids and len(plan.token_ids) != plan.num_tokens:
        raise ProtocolError(
            f"{where}: {len(plan.token_ids)} token ids for {plan.num_tokens} scheduled tokens"
        )
    _check_vocab(plan.token_ids, limits.vocab_size, where)


def _check_scheduled(plan: StepPlan, limits: PlanLimits, where: str) -> None:
    seen: set[int] = set()
    for seq in plan.scheduled:
        if seq.seq_id in seen:
            raise ProtocolError(f"{where}: sequence {seq.seq_id} is scheduled twice")
        seen.add(seq.seq_id)
        if seq.num_new_tokens < 1:
            raise ProtocolError(f"{where}: sequence {seq.seq_id} is scheduled with no tokens")
        if limits.num_kv_blocks and any(b >= limits.num_kv_blocks for b in seq.new_block_ids):
            raise ProtocolError(
                f"{where}: sequence {seq.seq_id} has a block id beyond this stage's "
                f"{limits.num_kv_blocks} blocks"
            )


def _check_new_sequences(plan: StepPlan, limits: PlanLimits, where: str) -> None:
    seen: set[int] = set()
    for new in plan.new_sequences:
        if new.seq_id in seen:
            raise ProtocolError(f"{where}: sequence {new.seq_id} is introduced twice")
        seen.add(new.seq_id)
        what = f"{where}: new sequence {new.seq_id}"
        _at_most(len(new.token_ids), limits.max_tokens_per_sequence, f"{what}: tokens")
        if not 0 < new.num_prompt_tokens <= len(new.token_ids):
            raise ProtocolError(
                f"{what}: num_prompt_tokens {new.num_prompt_tokens} is not in "
                f"[1, {len(new.token_ids)}]"
            )
        _check_vocab(new.token_ids, limits.vocab_size, what)
        _at_most(len(new.sampling.stop), limits.max_stop_strings, f"{what}: stop strings")


def _check_vocab(token_ids: Iterable[int], vocab_size: int, where: str) -> None:
    ids = tuple(token_ids)
    if vocab_size <= 0 or not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return
    bad = next((t for t in ids if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ProtocolError(f"{where}: token id {bad} is outside the vocabulary [0, {vocab_size})")


def _at_most(count: int, limit: int, what: str) -> None:
    if count > limit:
        raise ProtocolError(f"{what}: {count} exceeds the limit of {limit}")
