"""The last stage's sampler: one token per row of logits, with vLLM's parameter semantics.

Pipeline for one step (rows only pay for the features they use):

1. fast path: every row greedy, no penalties, no min_tokens masking, no logprobs -> argmax;
2. structured-output rows: the grammar's mask on a copy of the logits (vLLM applies it
   before its sampler);
3. logprobs: log-softmax of those logits (before any other adjustment), vLLM's default
   ``raw_logprobs``;
4. allowed token ids (vLLM's mask: every other token -inf), bad words, logit bias,
   min_tokens masking and penalties on a copy of the logits;
5. greedy rows: argmax; other rows: temperature, min-p, top-k, top-p, then inverse-CDF
   sampling with one uniform number per row (seeded rows: from ``(seed, output step)``;
   unseeded rows: from the sampler's own generator).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from molink.errors import MolinkError
from molink.sampling.bias import apply_allowed_token_ids, apply_bad_words, apply_logit_bias
from molink.sampling.filters import apply_min_p, apply_top_k_top_p
from molink.sampling.penalties import (
    apply_min_tokens,
    apply_penalties,
    min_tokens_blocked_ids,
    needs_penalties,
)
from molink.sampling.seeding import seeded_uniform
from molink.sampling.state import SequenceSamplingState
from molink.sampling.structured import GrammarCompiler, apply_bitmask
from molink.step import TokenLogprob

logger = logging.getLogger(__name__)

SampleOutput = tuple[int, float | None, tuple[TokenLogprob, ...]]


class SamplerInputError(MolinkError, ValueError):
    """The logits do not match the states or the vocabulary the sampler was built for."""


def _refuse_rows_without_tokens(
    logits: torch.Tensor, states: Sequence[SequenceSamplingState]
) -> None:
    """A row whose every token is masked out has nothing to sample (greedy would take token
    0, sampling would draw from NaNs): its request fails, naming what excluded them, e.g.
    ``allowed_token_ids`` holding only stop tokens while ``min_tokens`` holds those back."""
    empty = torch.isneginf(logits).all(dim=-1)
    if not bool(empty.any()):
        return
    params = states[int(empty.nonzero()[0])].params
    used = [
        name
        for name, on in (
            ("allowed_token_ids", bool(params.allowed_token_ids)),
            ("bad_words", bool(params.bad_words_token_ids)),
            ("logit_bias", bool(params.logit_bias)),
            ("min_tokens", params.min_tokens > 0),
            ("structured output", params.structured is not None),
        )
        if on
    ]
    why = ", ".join(used) + " together exclude every token" if used else "every logit is -inf"
    raise SamplerInputError(f"no token can be sampled: {why}")


class Sampler:
    """Samples one token per sequence from ``[N, V]`` logits; appends nothing to the states."""

    def __init__(
        self,
        eos_token_ids: tuple[int, ...],
        vocab_size: int,
        seed: int | None = None,
        grammars: GrammarCompiler | None = None,
    ) -> None:
        if vocab_size <= 0:
            raise SamplerInputError(f"vocab_size must be positive, got {vocab_size}")
        self.eos_token_ids = tuple(eos_token_ids)
        self.vocab_size = vocab_size
        self.grammars = grammars  # None: requests with structured output are refused
        # Unseeded rows share this generator; it lives on the CPU so that draws do not depend
        # on the accelerator.
        self._generator = torch.Generator()
        if seed is None:
            self._generator.seed()
        else:
            self._generator.manual_seed(seed)

    def sample(
        self, logits: torch.Tensor, states: Sequence[SequenceSamplingState]
    ) -> list[SampleOutput]:
        """Return ``(token_id, logprob or None, top alternatives)`` for each row."""
        logits = self._checked_logits(logits, states)
        if not states:
            return []
        blocked = [
            (row, min_tokens_blocked_ids(s, self.eos_token_ids)) for row, s in enumerate(states)
        ]
        blocked = [(row, ids) for row, ids in blocked if ids]
        penalty_rows = [row for row, s in enumerate(states) if needs_penalties(s.params)]
        logprob_rows = [row for row, s in enumerate(states) if s.params.logprobs is not None]
        bias_rows = [row for row, s in enumerate(states) if s.params.logit_bias]
        allowed_rows = [row for row, s in enumerate(states) if s.params.allowed_token_ids]
        bad_word_rows = [row for row, s in enumerate(states) if s.params.bad_words_token_ids]
        masked = allowed_rows or bad_word_rows
        grammar_rows = [row for row, s in enumerate(states) if s.params.structured is not None]
        adjusted = blocked or penalty_rows or bias_rows or masked or grammar_rows
        if not adjusted and not logprob_rows:
            if all(s.params.is_greedy for s in states):
                return [(token_id, None, ()) for token_id in logits.argmax(dim=-1).tolist()]
        if grammar_rows:
            # vLLM masks the logits with the grammar before its sampler sees them, so its
            # raw logprobs are those of the allowed tokens alone.
            logits = logits.clone()
            self._apply_grammars(logits, grammar_rows, states)
        raw_logprobs = None
        if logprob_rows:
            raw_logprobs = torch.log_softmax(logits[logprob_rows], dim=-1)
        if blocked or penalty_rows or bias_rows or masked:
            logits = logits if grammar_rows else logits.clone()
            apply_allowed_token_ids(logits, allowed_rows, states)
            apply_bad_words(logits, bad_word_rows, states)
            apply_logit_bias(logits, bias_rows, states)
            apply_min_tokens(logits, blocked)
            apply_penalties(logits, penalty_rows, states)
        if masked or bias_rows or blocked or grammar_rows:
            _refuse_rows_without_tokens(logits, states)
        token_ids = self._choose_tokens(logits, states)
        return self._with_logprobs(token_ids, raw_logprobs, logprob_rows, states)

    def attach(self, state: SequenceSamplingState) -> None:
        """Gives a new (or re-sent) sequence its grammar matcher, advanced over the outputs it
        already has. A failure is kept in ``state.error`` and ends that sequence alone."""
        spec = state.params.structured
        if spec is None:
            return
        try:
            if self.grammars is None:
                raise SamplerInputError("structured output is not available on this stage")
            state.grammar = self.grammars.matcher(spec)
            for token_id in state.token_ids[state.num_prompt_tokens :]:
                state.grammar.accept(token_id)
        except MolinkError as exc:
            state.error = str(exc)

    def accept(self, state: SequenceSamplingState, token_id: int) -> None:
        """Appends a sampled token to the sequence (and advances its grammar)."""
        state.token_ids.append(token_id)
        if state.grammar is not None:
            state.grammar.accept(token_id)

    def sample_isolated(
        self, logits: torch.Tensor, states: Sequence[SequenceSamplingState]
    ) -> list[SampleOutput | MolinkError]:
        """Like ``sample``, but a row that fails (its own error, a grammar in an error
        state, bad parameters) comes back as its error while the other rows are sampled.
        The batch runs as one; only when it fails are the rows retried one by one."""
        if not any(s.error for s in states):
            try:
                return list(self.sample(logits, states))
            except MolinkError as exc:  # a request's own parameters: no stack to show
                logger.info("sampling a batch failed (%s); retrying row by row", exc)
            except Exception:
                if len(states) <= 1:
                    logger.exception("sampling failed")
                else:
                    logger.warning("sampling a batch failed; retrying row by row", exc_info=True)
        results: list[SampleOutput | MolinkError] = []
        for row, state in enumerate(states):
            if state.error:
                results.append(SamplerInputError(state.error))
                continue
            try:
                results.append(self.sample(logits[row : row + 1], [state])[0])
            except Exception as exc:
                results.append(SamplerInputError(f"sampling failed: {exc}"))
        return results

    def _apply_grammars(
        self,
        logits: torch.Tensor,
        rows: list[int],
        states: Sequence[SequenceSamplingState],
    ) -> None:
        if not rows:
            return
        words = (logits.shape[1] + 31) // 32
        masks = torch.zeros((len(rows), words), dtype=torch.int32)
        for i, row in enumerate(rows):
            grammar = states[row].grammar
            if grammar is None:
                raise SamplerInputError(states[row].error or "the sequence has no grammar")
            grammar.fill_mask(masks[i])
        apply_bitmask(logits, rows, masks)

    def _checked_logits(
        self, logits: torch.Tensor, states: Sequence[SequenceSamplingState]
    ) -> torch.Tensor:
        if logits.dim() != 2 or logits.shape[0] != len(states):
            raise SamplerInputError(
                f"expected logits of shape [{len(states)}, vocab], got {tuple(logits.shape)}"
            )
        if logits.shape[1] < self.vocab_size:
            raise SamplerInputError(
                f"logits have {logits.shape[1]} columns, fewer than the vocabulary ({self.vocab_size})"
            )
        # Models often pad the output embedding; padded columns are not tokens.
        logits = logits[:, : self.vocab_size]
        if logits.dtype != torch.float32:
            logits = logits.float()
        return logits

    def _choose_tokens(
        self, logits: torch.Tensor, states: Sequence[SequenceSamplingState]
    ) -> list[int]:
        random_rows = [row for row, s in enumerate(states) if not s.params.is_greedy]
        if not random_rows:
            return logits.argmax(dim=-1).tolist()
        greedy_rows = [row for row, s in enumerate(states) if s.params.is_greedy]
        token_ids = [0] * len(states)
        if greedy_rows:
            greedy_tokens = logits[greedy_rows].argmax(dim=-1).tolist()
            for row, token_id in zip(greedy_rows, greedy_tokens, strict=True):
                token_ids[row] = token_id
        random_states = [states[row] for row in random_rows]
        random_tokens = self._sample_random(logits[random_rows], random_states)
        for row, token_id in zip(random_rows, random_tokens, strict=True):
            token_ids[row] = token_id
        return token_ids

    def _sample_random(
        self, logits: torch.Tensor, states: Sequence[SequenceSamplingState]
    ) -> list[int]:
        """Sample from ``logits`` (a private copy, modified in place), one row per state."""
        device = logits.device
        params = [s.params for s in states]
        temperature = torch.tensor([p.temperature for p in params], device=device)
        logits.div_(temperature.unsqueeze(1))
        if any(p.min_p > 0 for p in params):
            apply_min_p(logits, [p.min_p for p in params])
        if any(p.top_p < 1 or p.top_k > 0 for p in params):
            apply_top_k_top_p(logits, [p.top_k for p in params], [p.top_p for p in params])
        probs = torch.softmax(logits, dim=-1)
        uniforms = torch.tensor(self._uniforms(states), dtype=probs.dtype, device=device)
        return _inverse_cdf(probs, uniforms).tolist()

    def _uniforms(self, states: Sequence[SequenceSamplingState]) -> list[float]:
        unseeded = [row for row, s in enumerate(states) if s.params.seed is None]
        shared = torch.rand(len(unseeded), generator=self._generator, dtype=torch.float64).tolist()
        draws = dict(zip(unseeded, shared, strict=True))
        return [
            draws[row]
            if s.params.seed is None
            else seeded_uniform(s.params.seed, s.num_output_tokens)
            for row, s in enumerate(states)
        ]

    def _with_logprobs(
        self,
        token_ids: list[int],
        raw_logprobs: torch.Tensor | None,
        logprob_rows: list[int],
        states: Sequence[SequenceSamplingState],
    ) -> list[SampleOutput]:
        outputs: list[SampleOutput] = [(token_id, None, ()) for token_id in token_ids]
        if raw_logprobs is None:
            return outputs
        device = raw_logprobs.device
        chosen = torch.tensor([token_ids[row] for row in logprob_rows], device=device)
        chosen_logprobs = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        max_k = max(states[row].params.logprobs or 0 for row in logprob_rows)
        top_values: list[list[float]] = [[] for _ in logprob_rows]
        top_ids: list[list[int]] = [[] for _ in logprob_rows]
        if max_k > 0:
            top = raw_logprobs.topk(min(max_k, raw_logprobs.shape[1]), dim=-1)
            top_values, top_ids = top.values.tolist(), top.indices.tolist()
        for i, row in enumerate(logprob_rows):
            k = states[row].params.logprobs or 0
            alternatives = tuple(
                TokenLogprob(token_id=t, logprob=v)
                for t, v in zip(top_ids[i][:k], top_values[i][:k], strict=True)
            )
            outputs[row] = (token_ids[row], chosen_logprobs[i], alternatives)
        return outputs


def _inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index of the first token whose cumulative probability exceeds ``u * total`` per row.

    A token with zero probability never is the first to exceed, so masked tokens are never
    drawn. The target is kept strictly below the total so rounding cannot run past the end.
    """
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[:, -1:]
    target = torch.minimum(
        uniforms.unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total))
    )
    chosen = torch.searchsorted(cumulative, target, right=True).squeeze(1)
    return chosen.clamp_(max=probs.shape[1] - 1)
