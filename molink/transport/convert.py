"""Step plans and results <-> their proto mirrors (molink/step.py <-> molink.proto).

Decoding checks structure only (a well-formed StepPlan comes out or ProtocolError is
raised); whether the plan makes sense for a stage is validate.py's job.
"""

from __future__ import annotations

from molink.errors import InvalidParameterError, ProtocolError
from molink.sampling_params import SamplingParams, StructuredOutputSpec
from molink.security.peer_text import peer_text
from molink.step import (
    FailureKind,
    NewSequenceData,
    PromptTokenLogprob,
    SampledToken,
    ScheduledSequence,
    StepPlan,
    StepResult,
    TokenLogprob,
)
from molink.transport.generated import molink_pb2 as pb


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        min_p=params.min_p,
        repetition_penalty=params.repetition_penalty,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop=list(params.stop),
        stop_token_ids=list(params.stop_token_ids),
        min_tokens=params.min_tokens,
        ignore_eos=params.ignore_eos,
        skip_special_tokens=params.skip_special_tokens,
        include_stop_str_in_output=params.include_stop_str_in_output,
        spaces_between_special_tokens=params.spaces_between_special_tokens,
        logit_bias=[pb.LogitBias(token_id=t, bias=b) for t, b in params.logit_bias],
        allowed_token_ids=list(params.allowed_token_ids),
        bad_words=[pb.TokenSequence(token_ids=ids) for ids in params.bad_words_token_ids],
    )
    if params.structured is not None:
        msg.structured.kind = params.structured.kind
        msg.structured.spec = params.structured.spec
    if params.prompt_logprobs is not None:
        msg.prompt_logprobs = params.prompt_logprobs
    # Optional fields: presence on the wire means "set", as None means "unset" here.
    if params.seed is not None:
        msg.seed = params.seed
    if params.max_tokens is not None:
        msg.max_tokens = params.max_tokens
    if params.logprobs is not None:
        msg.logprobs = params.logprobs
    return msg


def sampling_from_proto(msg: pb.SamplingParams) -> SamplingParams:
    try:
        return SamplingParams(
            n=msg.n,
            temperature=msg.temperature,
            top_p=msg.top_p,
            top_k=msg.top_k,
            min_p=msg.min_p,
            repetition_penalty=msg.repetition_penalty,
            presence_penalty=msg.presence_penalty,
            frequency_penalty=msg.frequency_penalty,
            seed=msg.seed if msg.HasField("seed") else None,
            stop=tuple(msg.stop),
            stop_token_ids=tuple(msg.stop_token_ids),
            max_tokens=msg.max_tokens if msg.HasField("max_tokens") else None,
            min_tokens=msg.min_tokens,
            ignore_eos=msg.ignore_eos,
            logprobs=msg.logprobs if msg.HasField("logprobs") else None,
            skip_special_tokens=msg.skip_special_tokens,
            include_stop_str_in_output=msg.include_stop_str_in_output,
            spaces_between_special_tokens=msg.spaces_between_special_tokens,
            logit_bias=tuple((b.token_id, b.bias) for b in msg.logit_bias),
            allowed_token_ids=tuple(msg.allowed_token_ids),
            bad_words_token_ids=tuple(tuple(s.token_ids) for s in msg.bad_words),
            structured=(
                StructuredOutputSpec(msg.structured.kind, msg.structured.spec)
                if msg.HasField("structured")
                else None
            ),
            prompt_logprobs=msg.prompt_logprobs if msg.HasField("prompt_logprobs") else None,
        )
    except InvalidParameterError as exc:
        raise ProtocolError(f"invalid sampling parameters: {exc}") from exc


def plan_to_proto(
    plan: StepPlan, include_token_ids: bool = True, include_block_ids: bool = True
) -> pb.StepPlan:
    """Forward messages leave out token ids (only the first stage reads them) and block ids
    (every node allocates its own)."""
    msg = pb.StepPlan(
        step_id=plan.step_id,
        scheduled=[
            pb.ScheduledSequence(
                seq_id=s.seq_id,
                num_computed_tokens=s.num_computed_tokens,
                num_new_tokens=s.num_new_tokens,
                new_block_ids=list(s.new_block_ids) if include_block_ids else [],
                sample=s.sample,
            )
            for s in plan.scheduled
        ],
        token_ids=list(plan.token_ids) if include_token_ids else [],
        new_sequences=[
            pb.NewSequence(
                seq_id=n.seq_id,
                token_ids=list(n.token_ids),
                num_prompt_tokens=n.num_prompt_tokens,
                sampling=sampling_to_proto(n.sampling),
            )
            for n in plan.new_sequences
        ],
        finished_seq_ids=list(plan.finished_seq_ids),
        micro_batch=plan.micro_batch,
    )
    if plan.witness_seq_ids is not None:  # absent means "every sequence's" (molink.proto)
        msg.witness.SetInParent()
        msg.witness.seq_ids.extend(plan.witness_seq_ids)
    return msg


def plan_from_proto(msg: pb.StepPlan) -> StepPlan:
    return StepPlan(
        step_id=msg.step_id,
        scheduled=tuple(
            ScheduledSequence(
                seq_id=s.seq_id,
                num_computed_tokens=s.num_computed_tokens,
                num_new_tokens=s.num_new_tokens,
                new_block_ids=tuple(s.new_block_ids),
                sample=s.sample,
            )
            for s in msg.scheduled
        ),
        token_ids=tuple(msg.token_ids),
        new_sequences=tuple(
            NewSequenceData(
                seq_id=n.seq_id,
                token_ids=tuple(n.token_ids),
                num_prompt_tokens=n.num_prompt_tokens,
                sampling=sampling_from_proto(n.sampling),
            )
            for n in msg.new_sequences
        ),
        finished_seq_ids=tuple(msg.finished_seq_ids),
        micro_batch=msg.micro_batch,
        witness_seq_ids=tuple(msg.witness.seq_ids) if msg.HasField("witness") else None,
    )


def result_to_proto(result: StepResult) -> pb.StepResult:
    msg = pb.StepResult(
        step_id=result.step_id,
        micro_batch=result.micro_batch,
        sampled=[_sampled_to_proto(t) for t in result.sampled],
    )
    if result.error is not None:
        msg.error = result.error
        msg.failure_kind = int(result.failure_kind)
        msg.failed_node_id = result.failed_node_id
    return msg


def _sampled_to_proto(token: SampledToken) -> pb.SampledToken:
    msg = pb.SampledToken(
        seq_id=token.seq_id,
        token_id=token.token_id,
        top_logprobs=[
            pb.TokenLogprob(token_id=t.token_id, logprob=t.logprob) for t in token.top_logprobs
        ],
    )
    if token.logprob is not None:
        msg.logprob = token.logprob
    if token.error is not None:
        msg.error = token.error
    for entry in token.prompt_logprobs:
        msg.prompt_logprobs.append(
            pb.PromptTokenLogprob(
                logprob=entry.logprob,
                top=[pb.TokenLogprob(token_id=t.token_id, logprob=t.logprob) for t in entry.top],
                rank=entry.rank,
            )
        )
    return msg


def result_from_proto(msg: pb.StepResult) -> StepResult:
    """The result without timings; see ``trace_to_timings`` for ``stage_timings``."""
    return StepResult(
        step_id=msg.step_id,
        micro_batch=msg.micro_batch,
        sampled=tuple(
            SampledToken(
                seq_id=t.seq_id,
                token_id=t.token_id,
                logprob=t.logprob if t.HasField("logprob") else None,
                top_logprobs=_logprobs_from_proto(t.top_logprobs),
                error=peer_text(t.error) if t.HasField("error") else None,
                prompt_logprobs=tuple(
                    PromptTokenLogprob(
                        p.logprob,
                        _logprobs_from_proto(p.top),
                        p.rank if p.HasField("rank") else None,
                    )
                    for p in t.prompt_logprobs
                ),
            )
            for t in msg.sampled
        ),
        error=peer_text(msg.error) if msg.HasField("error") else None,
        failure_kind=_failure_kind(msg) if msg.HasField("error") else FailureKind.NONE,
        failed_node_id=msg.failed_node_id,
    )


def _logprobs_from_proto(entries) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(token_id=e.token_id, logprob=e.logprob) for e in entries)


def _failure_kind(msg: pb.StepResult) -> FailureKind:
    """An unknown kind (a newer peer) counts as a node error: the step is not retried."""
    try:
        return FailureKind(msg.failure_kind)
    except ValueError:
        return FailureKind.NODE_ERROR


def trace_to_timings(trace: list[pb.HopTrace]) -> dict[str, dict[str, float]]:
    """``StepResult.stage_timings``: per node, seconds queued and computing, bytes received."""
    return {
        hop.node_id: {
            "queue_s": hop.queue_s,
            "compute_s": hop.compute_s,
            "bytes_received": float(hop.bytes_received),
        }
        for hop in trace
    }
