"""The contract between the head's scheduler and every stage: one step of one micro-batch.

A ``StepPlan`` is what the scheduler decides for one micro-batch; every stage executes it for
its own layers; the last stage samples and answers with a ``StepResult``.

Rules (the wire mirrors them one to one):

* Every node owns its KV cache: a stage allocates blocks itself for the sequences it is
  sent, keyed by (head id, sequence id), and refuses a step it has no room for
  (``FailureKind.KV_FULL``). Block ids in a plan (``new_block_ids``) are the head's own,
  for the stage it computes in its process; they never travel.
* A sequence's data (tokens, sampling parameters) reaches a stage once, in
  ``new_sequences``. It is sent again only when the stage must (re)start the sequence from
  scratch: first admission, resumption after preemption, or replay on another node.
* After that only diffs travel: the counters of each ``ScheduledSequence``, the flat
  ``token_ids`` of this step (read by the first stage only), and ``finished_seq_ids``
  (forget the sequence and free its blocks).
* Rows of the flattened token batch follow the order of ``scheduled``.
* The last stage keeps each sequence's token history for penalties and appends what it
  samples itself, so sampled tokens never travel forward.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from molink.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewSequenceData:
    """Everything a stage needs to know about a sequence, sent once."""

    seq_id: int
    token_ids: tuple[int, ...]  # all known tokens: prompt, plus outputs when resuming/replaying
    num_prompt_tokens: int  # the first num_prompt_tokens of token_ids are the prompt
    sampling: SamplingParams  # seed is already specific to this sequence (n > 1 siblings differ)


@dataclass(frozen=True)
class ScheduledSequence:
    """One sequence's share of a step."""

    seq_id: int
    num_computed_tokens: int  # tokens already in the KV cache = position of the first new token
    num_new_tokens: int
    new_block_ids: tuple[int, ...] = ()  # appended to the sequence's block table this step
    sample: bool = False  # the chunk reaches the end of the known tokens: sample one token


@dataclass(frozen=True)
class StepPlan:
    step_id: int
    scheduled: tuple[ScheduledSequence, ...]
    token_ids: tuple[int, ...]  # flat, sum(num_new_tokens) long, in `scheduled` order
    new_sequences: tuple[NewSequenceData, ...] = ()
    finished_seq_ids: tuple[int, ...] = ()
    micro_batch: int = 0  # which in-flight slot this plan belongs to
    # Spot checks: the sequences whose input rows stages keep for the head to ask about
    # (molink.pipeline.witness); None: every sequence's (a plan from an older head).
    witness_seq_ids: tuple[int, ...] | None = ()

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float


@dataclass(frozen=True)
class PromptTokenLogprob:
    """A prompt token's logprob given the tokens before it, and the k most likely there."""

    logprob: float
    top: tuple[TokenLogprob, ...] = ()
    # How many vocabulary tokens are at least as likely there (1: the most likely), as
    # vLLM's rank; None where it was not computed.
    rank: int | None = None


@dataclass(frozen=True)
class SampledToken:
    seq_id: int
    token_id: int
    logprob: float | None = None  # of the sampled token, when requested
    top_logprobs: tuple[TokenLogprob, ...] = ()  # the k most likely alternatives
    error: str | None = None  # this sequence alone failed on the last stage (no token)
    # With a sequence's first token, when it asked for prompt_logprobs: prompt tokens 1..P-1.
    prompt_logprobs: tuple[PromptTokenLogprob, ...] = ()


class FailureKind(enum.IntEnum):
    """Why a step failed (mirrors molink.proto's FailureKind). The head acts on the kind:
    ``KV_FULL`` means a node kept nothing of the step, so its sequences can be preempted and
    tried again; every other kind fails them (until replay exists)."""

    NONE = 0
    KV_FULL = 1
    REJECTED = 2
    NODE_ERROR = 3
    UNREACHABLE = 4
    DEADLINE = 5


@dataclass(frozen=True)
class StepResult:
    step_id: int
    sampled: tuple[SampledToken, ...] = ()  # one per ScheduledSequence with sample=True
    micro_batch: int = 0
    error: str | None = None  # a stage failed; the head fails the affected requests
    stage_timings: dict = field(default_factory=dict, compare=False)
    failure_kind: FailureKind = FailureKind.NONE  # set with ``error``
    failed_node_id: str = ""  # the node the failure is about, when known
    # Head only, never on the wire: sequences whose sampled token waits for a spot check's
    # verdict (molink.pipeline.spot_holds); the scheduler keeps it from their users until
    # the head says whether it stands.
    held_seq_ids: tuple[int, ...] = ()
