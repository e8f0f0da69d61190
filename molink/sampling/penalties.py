"""Logit adjustments that depend on a sequence's tokens: min_tokens, repetition/presence/frequency.

All functions modify ``logits`` in place and touch only the rows (and tokens) that need it.
Index tensors are assembled on the CPU and moved to the logits' device in one transfer each.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from molink.sampling.state import SequenceSamplingState
from molink.sampling_params import SamplingParams


def needs_penalties(params: SamplingParams) -> bool:
    return (
        params.repetition_penalty != 1.0
        or params.presence_penalty != 0.0
        or params.frequency_penalty != 0.0
    )


def min_tokens_blocked_ids(
    state: SequenceSamplingState, eos_token_ids: tuple[int, ...]
) -> tuple[int, ...]:
    """Token ids that must not be sampled yet because fewer than min_tokens were generated.

    As in vLLM, these are the EOS ids and the stop_token_ids, whether or not ignore_eos is
    set (vLLM masks its ``all_stop_token_ids``, which always hold the EOS ids).
    """
    params = state.params
    if state.num_output_tokens >= params.min_tokens:
        return ()
    return tuple(dict.fromkeys(eos_token_ids + params.stop_token_ids))


def apply_min_tokens(
    logits: torch.Tensor, blocked_by_row: Sequence[tuple[int, tuple[int, ...]]]
) -> None:
    """Set the blocked token ids of each listed row to -inf."""
    vocab_size = logits.shape[1]
    rows: list[int] = []
    cols: list[int] = []
    for row, token_ids in blocked_by_row:
        for token_id in token_ids:
            if token_id < vocab_size:
                rows.append(row)
                cols.append(token_id)
    if not rows:
        return
    row_index = torch.tensor(rows, dtype=torch.long).to(logits.device)
    col_index = torch.tensor(cols, dtype=torch.long).to(logits.device)
    logits[row_index, col_index] = float("-inf")


def apply_penalties(
    logits: torch.Tensor, rows: Sequence[int], states: Sequence[SequenceSamplingState]
) -> None:
    """Apply repetition, frequency and presence penalties to the given rows.

    Repetition penalty (HF/vLLM): over prompt and output tokens, positive logits are divided
    by the penalty and negative ones multiplied. Frequency and presence penalties (OpenAI):
    over output tokens only, ``logit -= frequency * count + presence * (count > 0)``.
    Repetition is applied first, as vLLM does.
    """
    repetition_parts: list[tuple[int, torch.Tensor, float]] = []
    output_parts: list[tuple[int, torch.Tensor, torch.Tensor, float, float]] = []
    for row in rows:
        state = states[row]
        params = state.params
        state.history.refresh(state.token_ids, state.num_prompt_tokens)
        counts = state.history.output_counts
        output_ids = torch.tensor(list(counts.keys()), dtype=torch.long)
        if params.repetition_penalty != 1.0:
            seen = torch.cat([state.history.prompt_unique(state.token_ids), output_ids])
            repetition_parts.append((row, seen, params.repetition_penalty))
        if (params.frequency_penalty != 0.0 or params.presence_penalty != 0.0) and counts:
            output_counts = torch.tensor(list(counts.values()), dtype=torch.float32)
            output_parts.append(
                (row, output_ids, output_counts, params.frequency_penalty, params.presence_penalty)
            )
    if repetition_parts:
        _apply_repetition(logits, repetition_parts)
    if output_parts:
        _apply_frequency_presence(logits, output_parts)


def _apply_repetition(logits: torch.Tensor, parts: list[tuple[int, torch.Tensor, float]]) -> None:
    lengths = torch.tensor([len(token_ids) for _, token_ids, _ in parts])
    row_index = torch.repeat_interleave(torch.tensor([row for row, _, _ in parts]), lengths)
    col_index = torch.cat([token_ids for _, token_ids, _ in parts])
    penalty = torch.repeat_interleave(
        torch.tensor([value for _, _, value in parts], dtype=logits.dtype), lengths
    )
    keep = col_index < logits.shape[1]
    device = logits.device
    row_index, col_index = row_index[keep].to(device), col_index[keep].to(device)
    penalty = penalty[keep].to(device)
    # A token seen in both prompt and output appears twice; both writes carry the same value
    # because each is computed from the unpenalised logit, so the penalty applies once.
    values = logits[row_index, col_index]
    logits[row_index, col_index] = torch.where(values > 0, values / penalty, values * penalty)


def _apply_frequency_presence(
    logits: torch.Tensor, parts: list[tuple[int, torch.Tensor, torch.Tensor, float, float]]
) -> None:
    lengths = torch.tensor([len(token_ids) for _, token_ids, _, _, _ in parts])
    row_index = torch.repeat_interleave(torch.tensor([part[0] for part in parts]), lengths)
    col_index = torch.cat([part[1] for part in parts])
    counts = torch.cat([part[2] for part in parts])
    frequency = torch.repeat_interleave(torch.tensor([part[3] for part in parts]), lengths)
    presence = torch.repeat_interleave(torch.tensor([part[4] for part in parts]), lengths)
    adjustment = frequency * counts + presence
    keep = col_index < logits.shape[1]
    device = logits.device
    row_index, col_index = row_index[keep].to(device), col_index[keep].to(device)
    adjustment = adjustment[keep].to(device=device, dtype=logits.dtype)
    logits[row_index, col_index] -= adjustment
