"""Prompt logprobs in the shapes clients read: OpenAI's completions ``echo`` + ``logprobs``
(what lm-evaluation-harness scores loglikelihood with) and vLLM's ``prompt_logprobs``."""

from __future__ import annotations

from typing import Any

from molink.api.logprobs import clamp_logprob, token_text
from molink.step import PromptTokenLogprob
from molink.tokenizer.protocol import TokenizerLike


def echo_logprobs(
    tokenizer: TokenizerLike,
    prompt_ids: list[int],
    entries: list[PromptTokenLogprob] | None,
) -> tuple[dict[str, Any], int]:
    """Completions-format logprobs of the prompt tokens (the first has none, as in OpenAI's
    and vLLM's answers); returns them and the text offset after the prompt."""
    entries = entries or []
    tokens, offsets, logprobs, tops = [], [], [], []
    offset = 0
    for position, token_id in enumerate(prompt_ids):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
        entry = entries[position - 1] if 0 < position <= len(entries) else None
        if entry is None:
            logprobs.append(None)
            tops.append(None)
            continue
        logprobs.append(clamp_logprob(entry.logprob))
        top = {token_text(tokenizer, alt.token_id): clamp_logprob(alt.logprob) for alt in entry.top}
        top.setdefault(text, clamp_logprob(entry.logprob))
        tops.append(top)
    body = {
        "tokens": tokens,
        "token_logprobs": logprobs,
        "top_logprobs": tops,
        "text_offset": offsets,
    }
    return body, offset


def join_logprobs(first: dict[str, Any], second: dict[str, Any] | None) -> dict[str, Any]:
    if second is None:
        return first
    return {key: first[key] + second[key] for key in first}


def vllm_prompt_logprobs(
    tokenizer: TokenizerLike, prompt_ids: list[int], entries: list[PromptTokenLogprob] | None
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's shape: per prompt token, None for the first, else token id -> logprob, rank
    (1 = most likely; the prompt token's real rank, also outside the top alternatives) and
    text."""
    result: list[dict[str, dict[str, Any]] | None] = [None]
    for token_id, entry in zip(prompt_ids[1:], entries or [], strict=False):
        ranked = {alt.token_id: rank for rank, alt in enumerate(entry.top, start=1)}
        rank = entry.rank if entry.rank is not None else ranked.get(token_id)
        item = {str(token_id): _vllm_entry(tokenizer, token_id, entry.logprob, rank)}
        for rank, alt in enumerate(entry.top, start=1):
            item.setdefault(
                str(alt.token_id), _vllm_entry(tokenizer, alt.token_id, alt.logprob, rank)
            )
        result.append(item)
    return result


def _vllm_entry(
    tokenizer: TokenizerLike, token_id: int, logprob: float, rank: int | None
) -> dict[str, Any]:
    return {
        "logprob": clamp_logprob(logprob),
        "rank": rank,
        "decoded_token": token_text(tokenizer, token_id),
    }
