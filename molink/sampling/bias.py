"""OpenAI's ``logit_bias`` (a per-token value added to the logits before sampling), vLLM's
``allowed_token_ids`` (every other token masked out) and ``bad_words`` (a word's last token
masked out right after the rest of it)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from molink.sampling.state import SequenceSamplingState


def apply_logit_bias(
    logits: torch.Tensor, rows: Sequence[int], states: Sequence[SequenceSamplingState]
) -> None:
    """Adds each listed row's biases in place; ids beyond the vocabulary are ignored (the
    API refuses them, but a stage must not fail on a peer's plan)."""
    vocab_size = logits.shape[1]
    row_index: list[int] = []
    col_index: list[int] = []
    values: list[float] = []
    for row in rows:
        for token_id, bias in states[row].params.logit_bias:
            if token_id < vocab_size:
                row_index.append(row)
                col_index.append(token_id)
                values.append(bias)
    if not row_index:
        return
    device = logits.device
    logits.index_put_(
        (
            torch.tensor(row_index, dtype=torch.long, device=device),
            torch.tensor(col_index, dtype=torch.long, device=device),
        ),
        torch.tensor(values, dtype=logits.dtype, device=device),
        accumulate=True,
    )


def apply_allowed_token_ids(
    logits: torch.Tensor, rows: Sequence[int], states: Sequence[SequenceSamplingState]
) -> None:
    """Sets every logit of each listed row to -inf but its allowed ids', in place, as vLLM
    does after the raw logprobs. Ids beyond the vocabulary are ignored (the API refuses
    them, but a stage must not fail on a peer's plan); a row left with none allowed is
    left as it was rather than made all -inf."""
    vocab_size = logits.shape[1]
    for row in rows:
        allowed = [t for t in states[row].params.allowed_token_ids if t < vocab_size]
        if not allowed:
            continue
        keep = torch.tensor(allowed, dtype=torch.long, device=logits.device)
        kept = logits[row, keep]
        logits[row].fill_(-torch.inf)
        logits[row, keep] = kept


def apply_bad_words(
    logits: torch.Tensor, rows: Sequence[int], states: Sequence[SequenceSamplingState]
) -> None:
    """For each listed row, sets to -inf the last token of every bad-word sequence whose
    other tokens end the row's generated tokens (a one-token word: always), in place, as
    vLLM does: the prompt does not count, and ids beyond the vocabulary are ignored."""
    vocab_size = logits.shape[1]
    for row in rows:
        state = states[row]
        words = state.params.bad_words_token_ids
        num_generated = len(state.token_ids) - state.num_prompt_tokens
        # Only the tail a word's prefix can match is read: a copy of every generated token
        # would cost O(output) on each step.
        longest = min(num_generated, max(len(word) for word in words) - 1)
        tail = tuple(state.token_ids[len(state.token_ids) - longest :]) if longest else ()
        for word in words:
            prefix, last = word[:-1], word[-1]
            if last >= vocab_size or len(prefix) > num_generated:
                continue
            if not prefix or tail[len(tail) - len(prefix) :] == prefix:
                logits[row, last] = -torch.inf
