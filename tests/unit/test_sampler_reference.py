"""The sampler against a direct transcription of vLLM's sampling steps.

vLLM's order: logit bias and min_tokens masking, penalties (repetition over prompt and
output, presence/frequency over output only), then for random rows temperature, min-p,
top-k and top-p (sort ascending, drop the tokens whose cumulative mass stays within
1 - top_p, always keep the most likely), and a draw. Greedy rows (temperature below 1e-5)
take the argmax of the penalised logits. Logprobs are vLLM's default ``raw_logprobs``: the
log-softmax of the logits before any of this. A seeded row's draw is ``seeded_uniform(seed,
output step)``, which the reference uses through inverse-CDF sampling.
"""

from __future__ import annotations

import random

import pytest
import torch

from molink.sampling import Sampler, SequenceSamplingState
from molink.sampling.seeding import seeded_uniform
from molink.sampling_params import SamplingParams, StructuredOutputSpec

torch.set_num_threads(1)

VOCAB = 64
EOS = (3, 7)


def _penalised(logits: torch.Tensor, prompt: list[int], output: list[int], p: SamplingParams):
    logits = logits.clone()
    for token_id, bias in p.logit_bias:
        logits[token_id] += bias
    if len(output) < p.min_tokens:
        for token_id in set(EOS) | set(p.stop_token_ids):
            logits[token_id] = float("-inf")
    for token_id in set(prompt) | set(output):
        value = logits[token_id]
        penalty = p.repetition_penalty
        logits[token_id] = value / penalty if value > 0 else value * penalty
    for token_id in set(output):
        count = output.count(token_id)
        logits[token_id] -= p.frequency_penalty * count + p.presence_penalty
    return logits


def _vllm_random_probs(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    logits = logits / p.temperature
    if p.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    sorted_logits, order = logits.sort(descending=False)
    if 0 < p.top_k < VOCAB:
        kth = sorted_logits[VOCAB - p.top_k]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if p.top_p < 1:
        cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cumulative <= 1 - p.top_p
        drop[-1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    filtered = torch.empty_like(logits).scatter_(0, order, sorted_logits)
    return torch.softmax(filtered, dim=-1)


def _reference_token(logits: torch.Tensor, state: SequenceSamplingState) -> int:
    p = state.params
    prompt = state.token_ids[: state.num_prompt_tokens]
    output = state.token_ids[state.num_prompt_tokens :]
    penalised = _penalised(logits, prompt, output, p)
    if p.temperature < 1e-5:
        return int(penalised.argmax())
    probs = _vllm_random_probs(penalised, p).double()
    u = seeded_uniform(p.seed, len(output))
    cumulative = probs.cumsum(dim=-1)
    return int(torch.searchsorted(cumulative, u * cumulative[-1], right=True).clamp(max=VOCAB - 1))


def _random_params(rng: random.Random) -> dict:
    return dict(
        temperature=rng.choice([0.0, 1e-6, 1e-3, 0.3, 0.7, 1.0, 1.5]),
        top_p=rng.choice([1.0, 0.95, 0.8, 0.5, 0.1]),
        top_k=rng.choice([-1, 0, 1, 2, 5, 20, VOCAB, 500]),
        min_p=rng.choice([0.0, 0.0, 0.05, 0.3]),
        repetition_penalty=rng.choice([1.0, 1.0, 1.3, 0.8]),
        presence_penalty=rng.choice([0.0, 0.5, -0.5]),
        frequency_penalty=rng.choice([0.0, 0.4, -0.3]),
        min_tokens=rng.choice([0, 0, 3]),
        stop_token_ids=tuple(rng.sample(range(VOCAB), rng.choice([0, 2]))),
        logit_bias=tuple(
            sorted({rng.randrange(VOCAB): rng.uniform(-5, 5) for _ in range(2)}.items())
        ),
        logprobs=rng.choice([None, 0, 3]),
        seed=rng.randrange(2**31),
        max_tokens=None,
    )


def _states(rng: random.Random, rows: int) -> list[SequenceSamplingState]:
    states = []
    for _ in range(rows):
        prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 6))]
        output = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 5))]
        states.append(
            SequenceSamplingState(
                SamplingParams(**_random_params(rng)), prompt + output, len(prompt)
            )
        )
    return states


@pytest.mark.parametrize("case", range(40))
def test_each_row_is_the_token_vllm_steps_choose(case: int) -> None:
    rng = random.Random(case)
    states = _states(rng, 6)
    logits = torch.randn(6, VOCAB, generator=torch.Generator().manual_seed(case)) * 3
    result = Sampler(EOS, VOCAB).sample(logits, states)
    raw = torch.log_softmax(logits, dim=-1)
    for row, state in enumerate(states):
        token, logprob, top = result[row]
        assert token == _reference_token(logits[row], state), (row, state.params)
        if state.params.logprobs is None:
            assert logprob is None and top == ()
            continue
        assert logprob == pytest.approx(raw[row, token].item(), abs=1e-6)
        k = state.params.logprobs
        assert [t.logprob for t in top] == pytest.approx(raw[row].topk(k).values.tolist(), abs=1e-6)


@pytest.mark.parametrize("case", range(10))
def test_a_seeded_row_samples_alike_alone_and_batched(case: int) -> None:
    rng = random.Random(100 + case)
    states = _states(rng, 5)
    logits = torch.randn(5, VOCAB, generator=torch.Generator().manual_seed(case)) * 3
    batched = Sampler(EOS, VOCAB, seed=1).sample(logits, states)
    for row, state in enumerate(states):
        alone = Sampler(EOS, VOCAB, seed=2).sample(logits[row : row + 1], [state])[0]
        assert alone == batched[row]


class _AllowOnly:
    """A grammar that allows a fixed set of tokens at every step."""

    def __init__(self, allowed: set[int]) -> None:
        self.allowed = allowed

    def fill_mask(self, mask: torch.Tensor) -> None:
        for token_id in self.allowed:
            word, bit = divmod(token_id, 32)
            value = int(mask[word]) | (1 << bit)
            mask[word] = value - (1 << 32) if value >= 1 << 31 else value

    def accept(self, token_id: int) -> None:
        assert token_id in self.allowed


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_of_a_structured_row_are_over_the_grammar_masked_logits(
    temperature: float,
) -> None:
    """vLLM applies the grammar bitmask to the logits before its sampler, so even its raw
    logprobs are those of the masked distribution: disallowed tokens get -inf."""
    allowed = {2, 5, 40}
    spec = StructuredOutputSpec("regex", "[a-z]+")
    state = SequenceSamplingState(
        SamplingParams(structured=spec, logprobs=4, temperature=temperature, seed=3), [1], 1
    )
    state.grammar = _AllowOnly(allowed)
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(4)) * 3
    ((token, logprob, top),) = Sampler(EOS, VOCAB).sample(logits, [state])
    masked = torch.full_like(logits[0], float("-inf"))
    masked[sorted(allowed)] = logits[0, sorted(allowed)]
    expected = torch.log_softmax(masked, dim=-1)
    assert token in allowed
    assert logprob == pytest.approx(expected[token].item(), abs=1e-6)
    assert [t.token_id for t in top[:3]] == expected.topk(3).indices.tolist()
    assert [t.logprob for t in top[:3]] == pytest.approx(expected.topk(3).values.tolist())
    assert top[3].logprob == float("-inf")
