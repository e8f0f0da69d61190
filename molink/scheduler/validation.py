"""Checks a request against the context length and the KV cache before it is queued, and
the tokens a step's result brings back against the vocabulary."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from molink.errors import ContextLengthExceededError, InvalidParameterError, OutOfCapacityError
from molink.sampling_params import SamplingParams
from molink.step import SampledToken, StepResult

logger = logging.getLogger(__name__)


def max_output_tokens_for(
    prompt_token_ids: Sequence[int],
    params: SamplingParams,
    max_model_len: int,
    num_kv_blocks: int,
    block_size: int,
) -> int:
    """How many tokens the request's sequences may generate; raises when it can never run.

    A sequence of L tokens needs KV for L - 1 of them (the last sampled token is never fed
    back). ``max_tokens=None`` means "up to max_model_len", further capped by what the
    whole KV cache can hold; such a sequence ends with finish reason "length" there.
    """
    _check_prompt(prompt_token_ids)
    num_prompt = len(prompt_token_ids)
    if num_prompt >= max_model_len:
        raise ContextLengthExceededError(num_prompt, max_model_len)
    max_tokens = params.max_tokens
    if max_tokens is not None and num_prompt + max_tokens > max_model_len:
        raise ContextLengthExceededError(
            num_prompt + max_tokens, max_model_len, what="prompt plus max_tokens"
        )
    capacity_tokens = num_kv_blocks * block_size
    num_kv_tokens = num_prompt + (1 if max_tokens is None else max_tokens) - 1
    if num_kv_tokens > capacity_tokens:
        raise OutOfCapacityError(
            f"the request needs KV cache for {num_kv_tokens} tokens, but the cache holds "
            f"{capacity_tokens} ({num_kv_blocks} blocks of {block_size} tokens)"
        )
    if max_tokens is not None:
        return max_tokens
    return min(max_model_len - num_prompt, capacity_tokens + 1 - num_prompt)


def check_prompt_token_ids(prompt_token_ids: Sequence[int], vocab_size: int) -> None:
    """Every id must have a row in the embedding: one that has none would fail the step
    that carries it, and with it every other request in that batch."""
    if not prompt_token_ids or any(
        isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size
        for t in prompt_token_ids
    ):
        raise InvalidParameterError(
            "prompt", f"token ids must be a non-empty list of integers in [0, {vocab_size})"
        )


def _check_prompt(prompt_token_ids: Sequence[int]) -> None:
    if len(prompt_token_ids) == 0:
        raise InvalidParameterError("prompt", "must contain at least one token")
    for token_id in prompt_token_ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
            raise InvalidParameterError("prompt", "token ids must be non-negative integers")


def check_sampled_tokens(result: StepResult, vocab_size: int) -> StepResult:
    """``result`` without the sampled tokens that name an id outside [0, vocab_size) (as
    their own id or as a logprob alternative): a node sends these ids, and the head feeds
    a sampled token to its own stage in the next step, where an id without an embedding
    row would fail the whole batch. A sequence left without its token replays
    (molink/scheduler/outcomes.py)."""
    if result.error is not None or all(_in_range(t, vocab_size) for t in result.sampled):
        return result
    for token in result.sampled:
        if not _in_range(token, vocab_size):
            logger.warning(
                "step %d: the last stage sent token id %d for sequence %d, or an alternative "
                "outside the vocabulary [0, %d); the token is dropped",
                result.step_id,
                token.token_id,
                token.seq_id,
                vocab_size,
            )
    kept = tuple(t for t in result.sampled if _in_range(t, vocab_size))
    return dataclasses.replace(result, sampled=kept)


def _in_range(token: SampledToken, vocab_size: int) -> bool:
    ids = [token.token_id, *(alt.token_id for alt in token.top_logprobs)]
    for entry in token.prompt_logprobs:
        ids += [alt.token_id for alt in entry.top]
    return all(0 <= token_id < vocab_size for token_id in ids)
