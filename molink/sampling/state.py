"""Per-sequence state the last stage keeps for sampling, and its cached token statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from molink.sampling.structured import GrammarMatcher
from molink.sampling_params import SamplingParams
from molink.step import PromptTokenLogprob


class TokenHistory:
    """Token statistics that penalties need, kept up to date incrementally.

    Rebuilding them from the full token list every step would cost O(sequence length) per row
    per step; instead the prompt's distinct tokens are computed once and output counts are
    updated only with the tokens appended since the previous step.
    """

    def __init__(self) -> None:
        self._prompt_unique: torch.Tensor | None = None
        self._num_prompt_tokens = -1
        self._output_counts: dict[int, int] = {}
        self._num_counted = 0  # index into token_ids up to which output counts are current

    def refresh(self, token_ids: list[int], num_prompt_tokens: int) -> None:
        if num_prompt_tokens != self._num_prompt_tokens or len(token_ids) < self._num_counted:
            # The sequence was restarted with different tokens: start over.
            self._prompt_unique = None
            self._num_prompt_tokens = num_prompt_tokens
            self._output_counts = {}
            self._num_counted = num_prompt_tokens
        counts = self._output_counts
        for token_id in token_ids[self._num_counted :]:
            counts[token_id] = counts.get(token_id, 0) + 1
        self._num_counted = len(token_ids)

    def prompt_unique(self, token_ids: list[int]) -> torch.Tensor:
        """Distinct prompt token ids (int64, CPU); computed on first use."""
        if self._prompt_unique is None:
            prompt = torch.tensor(token_ids[: self._num_prompt_tokens], dtype=torch.long)
            self._prompt_unique = torch.unique(prompt)
        return self._prompt_unique

    @property
    def output_counts(self) -> dict[int, int]:
        return self._output_counts


@dataclass
class SequenceSamplingState:
    """What the last stage knows about one sequence for sampling.

    ``token_ids`` holds the prompt followed by the outputs so far; the stage appends each
    sampled token itself (the sampler appends nothing).
    """

    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    history: TokenHistory = field(
        default_factory=TokenHistory, init=False, repr=False, compare=False
    )
    grammar: GrammarMatcher | None = field(default=None, repr=False, compare=False)
    # Why this sequence cannot be sampled (e.g. its grammar failed to compile); it ends
    # with an error at its next sample, alone.
    error: str | None = field(default=None, compare=False)
    # Prompt logprobs gathered chunk by chunk until the first token is sampled.
    prompt_logprobs: list[PromptTokenLogprob] = field(
        default_factory=list, repr=False, compare=False
    )

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens
