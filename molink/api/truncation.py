"""vLLM's truncate_prompt_tokens: a prompt longer than k tokens keeps its last k."""

from __future__ import annotations

from collections.abc import Sequence

from molink.api.errors import APIError

FIELD = "truncate_prompt_tokens"


def truncation_length(requested: int, max_model_len: int) -> int:
    """The tokens a prompt keeps: ``requested``, or the whole context for -1 (vLLM's)."""
    if requested == -1:
        return max_model_len
    if not 1 <= requested <= max_model_len:
        raise APIError(
            400,
            f"{FIELD}: {requested} must be -1 (the context length) or in [1, {max_model_len}] "
            f"(the context length)",
            FIELD,
        )
    return requested


def truncated(token_ids: Sequence[int], keep: int) -> list[int]:
    """The last ``keep`` tokens: the end of a prompt is what the reply continues."""
    return list(token_ids[-keep:])
