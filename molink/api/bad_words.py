"""vLLM's ``bad_words``: words a request forbids, as the token sequences the sampler masks.

As vLLM tokenizes them: each word with its leading spaces stripped, and again after one
space (the spelling it takes inside a text), the second kept only when it is a different
first token and as many tokens (else it is not the same word). The last stage then never
samples a sequence's last token right after the rest of it (molink.sampling.bias).
"""

from __future__ import annotations

from typing import Any

from molink.api.errors import APIError
from molink.limits import LIMITS
from molink.tokenizer.protocol import TokenizerLike


def bad_words_token_ids(value: Any, tokenizer: TokenizerLike) -> tuple[tuple[int, ...], ...]:
    """The token sequences of a request's ``bad_words`` (None or []: none); a 400 naming
    bad_words for anything but a list of non-empty strings within the bounds."""
    if value is None:
        return ()
    if not isinstance(value, list) or len(value) > LIMITS.max_bad_words:
        raise APIError(
            400,
            f"bad_words must be a list of at most {LIMITS.max_bad_words} strings",
            "bad_words",
        )
    sequences: list[tuple[int, ...]] = []
    for word in value:
        if not isinstance(word, str) or not word.strip():
            raise APIError(400, "bad_words must hold non-empty strings", "bad_words")
        if len(word) > LIMITS.max_bad_word_chars:
            raise APIError(
                400,
                f"bad_words: a word is over {LIMITS.max_bad_word_chars} characters",
                "bad_words",
            )
        sequences += _spellings(word, tokenizer)
    for ids in sequences:
        if len(ids) > LIMITS.max_bad_word_tokens:
            raise APIError(
                400,
                f"bad_words: a word takes over {LIMITS.max_bad_word_tokens} tokens",
                "bad_words",
            )
    return tuple(dict.fromkeys(sequences))  # once each, in order


def _spellings(word: str, tokenizer: TokenizerLike) -> list[tuple[int, ...]]:
    alone = tuple(tokenizer.encode(word.lstrip(), add_special_tokens=False))
    inside = tuple(tokenizer.encode(" " + word.lstrip(), add_special_tokens=False))
    found = [alone] if alone else []
    if inside and alone and inside[0] != alone[0] and len(inside) == len(alone):
        found.append(inside)
    return found
