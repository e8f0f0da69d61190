"""Stop conditions checked after each sampled token (stop strings are the engine's job)."""

from __future__ import annotations

from dataclasses import dataclass

from molink.scheduler.sequence import Sequence


@dataclass(frozen=True)
class StopDecision:
    finish_reason: str  # "stop" | "length"
    stop_reason: int | None = None  # the matching stop_token_ids entry


def check_stop(
    seq: Sequence, token_id: int, eos_token_ids: frozenset[int], max_model_len: int
) -> StopDecision | None:
    """Whether ``seq`` ends with ``token_id``, its newest token (already appended).

    EOS and stop_token_ids only count once more than ``min_tokens`` tokens were generated,
    i.e. the first ``min_tokens`` outputs can never stop the sequence. EOS is ignored with
    ``ignore_eos``; stop_token_ids still apply then. A stop token wins over a length limit.
    """
    params = seq.params
    num_output = seq.num_output_tokens
    if num_output > params.min_tokens:
        if not params.ignore_eos and token_id in eos_token_ids:
            return StopDecision("stop")
        if token_id in params.stop_token_ids:
            return StopDecision("stop", token_id)
    if num_output >= seq.max_output_tokens or seq.num_tokens >= max_model_len:
        return StopDecision("length")
    return None
