"""Log-probabilities in the two shapes OpenAI uses: completions (legacy) and chat."""

from __future__ import annotations

import math
from typing import Any

from molink.outputs import CompletionOutput
from molink.step import TokenLogprob
from molink.tokenizer.protocol import TokenizerLike

# JSON has no -Infinity; clients get a very unlikely but finite value instead (as vLLM does).
_MIN_LOGPROB = -9999.0


def clamp_logprob(value: float | None) -> float | None:
    if value is None:
        return None
    if math.isnan(value) or value < _MIN_LOGPROB:
        return _MIN_LOGPROB
    return float(value)


def token_text(tokenizer: TokenizerLike, token_id: int) -> str:
    """The text a single token stands for, special tokens included."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


class TokenIdNames:
    """A tokenizer whose single tokens read "token_id:N" in logprobs (vLLM's
    return_tokens_as_token_ids): a token that is part of a character still has a name."""

    def __init__(self, tokenizer: TokenizerLike) -> None:
        self._tokenizer = tokenizer

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"token_id:{token_id}" for token_id in token_ids)

    def __getattr__(self, name: str) -> object:
        return getattr(self._tokenizer, name)


def logprob_names(tokenizer: TokenizerLike, as_token_ids: bool) -> TokenizerLike:
    """What names tokens in a response's logprobs."""
    return TokenIdNames(tokenizer) if as_token_ids else tokenizer  # type: ignore[return-value]


def _slice(
    output: CompletionOutput, start: int, end: int
) -> tuple[list[int], list[float | None], list[list[TokenLogprob]]]:
    token_ids = output.token_ids[start:end]
    logprobs: list[float | None] = list((output.logprobs or [])[start:end])
    logprobs += [None] * (len(token_ids) - len(logprobs))
    tops = list((output.top_logprobs or [])[start:end])
    tops += [[] for _ in range(len(token_ids) - len(tops))]
    return token_ids, logprobs, tops


def completion_logprobs(
    tokenizer: TokenizerLike,
    output: CompletionOutput,
    start: int,
    end: int,
    text_offset: int,
) -> tuple[dict[str, Any], int]:
    """Completions-format logprobs of tokens [start, end); returns them and the next offset.

    ``top_logprobs`` holds the sampled token and its alternatives, keyed by token text.
    """
    token_ids, logprobs, tops = _slice(output, start, end)
    tokens: list[str] = []
    offsets: list[int] = []
    top_dicts: list[dict[str, float] | None] = []
    for token_id, logprob, top in zip(token_ids, logprobs, tops, strict=True):
        text = token_text(tokenizer, token_id)
        tokens.append(text)
        offsets.append(text_offset)
        text_offset += len(text)
        entry = {token_text(tokenizer, alt.token_id): clamp_logprob(alt.logprob) for alt in top}
        if logprob is not None:
            entry.setdefault(text, clamp_logprob(logprob))
        top_dicts.append(entry)
    body = {
        "tokens": tokens,
        "token_logprobs": [clamp_logprob(lp) for lp in logprobs],
        "top_logprobs": top_dicts,
        "text_offset": offsets,
    }
    return body, text_offset


def chat_logprobs(
    tokenizer: TokenizerLike, output: CompletionOutput, start: int, end: int, num_top: int
) -> dict[str, Any]:
    """Chat-format logprobs (``{"content": [...]}``) of tokens [start, end)."""
    token_ids, logprobs, tops = _slice(output, start, end)
    content = []
    for token_id, logprob, top in zip(token_ids, logprobs, tops, strict=True):
        entry = _chat_token(tokenizer, token_id, logprob)
        entry["top_logprobs"] = [
            _chat_token(tokenizer, alt.token_id, alt.logprob) for alt in top[:num_top]
        ]
        content.append(entry)
    return {"content": content}


def _chat_token(tokenizer: TokenizerLike, token_id: int, logprob: float | None) -> dict[str, Any]:
    text = token_text(tokenizer, token_id)
    return {
        "token": text,
        "logprob": clamp_logprob(logprob if logprob is not None else _MIN_LOGPROB),
        "bytes": list(text.encode("utf-8")),
    }
