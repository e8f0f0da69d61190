"""Prompt logprobs (vLLM's ``prompt_logprobs``, OpenAI's ``echo`` with ``logprobs``).

The logits of the row at position p predict prompt token p + 1. The last stage computes
them chunk by chunk as the prompt is prefilled, from the raw logits (before any sampling
adjustment), and returns them all with the sequence's first sampled token.
"""

from __future__ import annotations

import torch

from molink.step import PromptTokenLogprob, TokenLogprob

# Rows of logits turned into log-probabilities at once: bounds memory for long prompts.
_ROWS_PER_PIECE = 128


def prompt_token_logprobs(
    logits: torch.Tensor, targets: list[int], num_top: int
) -> list[PromptTokenLogprob]:
    """``logits[i]`` predicts ``targets[i]``; ``len(targets) <= logits.shape[0]``."""
    entries: list[PromptTokenLogprob] = []
    for start in range(0, len(targets), _ROWS_PER_PIECE):
        piece_targets = targets[start : start + _ROWS_PER_PIECE]
        piece = logits[start : start + len(piece_targets)].float()
        logprobs = torch.log_softmax(piece, dim=-1)
        index = torch.tensor(piece_targets, dtype=torch.long, device=logprobs.device)
        chosen_column = logprobs.gather(1, index.unsqueeze(1))
        chosen = chosen_column.squeeze(1).tolist()
        # vLLM's rank: the tokens at least as likely as the prompt token, itself included.
        ranks = (logprobs >= chosen_column).sum(dim=1).tolist()
        top_ids: list[list[int]] = [[] for _ in piece_targets]
        top_values: list[list[float]] = [[] for _ in piece_targets]
        if num_top > 0:
            top = logprobs.topk(min(num_top, logprobs.shape[1]), dim=-1)
            top_ids, top_values = top.indices.tolist(), top.values.tolist()
        for value, rank, ids, values in zip(chosen, ranks, top_ids, top_values, strict=True):
            alternatives = tuple(TokenLogprob(t, v) for t, v in zip(ids, values, strict=True))
            entries.append(PromptTokenLogprob(value, alternatives, rank))
    return entries
