"""Sampler: each feature against a hand computation on small vocabularies."""

from __future__ import annotations

import math

import pytest
import torch

from molink.sampling import Sampler, SamplerInputError, SequenceSamplingState
from molink.sampling.filters import apply_top_k_top_p
from molink.sampling.penalties import apply_penalties
from molink.sampling.seeding import seeded_uniform
from molink.sampling_params import SamplingParams

torch.set_num_threads(1)

EOS = 3


def make_state(
    prompt: list[int] | None = None, outputs: list[int] | None = None, **params: object
) -> SequenceSamplingState:
    prompt = [0] if prompt is None else prompt
    outputs = outputs or []
    return SequenceSamplingState(SamplingParams(**params), prompt + outputs, len(prompt))


def counts_of(tokens: list[int], vocab_size: int) -> list[int]:
    return torch.bincount(torch.tensor(tokens), minlength=vocab_size).tolist()


def test_greedy_matches_argmax() -> None:
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1))
    states = [make_state(temperature=0.0) for _ in range(6)]
    result = Sampler((EOS,), 50).sample(logits, states)
    assert [token for token, _, _ in result] == logits.argmax(dim=-1).tolist()
    assert all(logprob is None and top == () for _, logprob, top in result)


def test_greedy_rows_in_a_mixed_batch_are_argmax() -> None:
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    states = [
        make_state(temperature=0.0),
        make_state(temperature=1.0, seed=1),
        make_state(temperature=0.0, logprobs=2),
        make_state(temperature=0.8),
    ]
    result = Sampler((EOS,), 30, seed=0).sample(logits, states)
    expected = logits.argmax(dim=-1).tolist()
    assert result[0][0] == expected[0]
    assert result[2][0] == expected[2]


def test_input_logits_are_not_modified() -> None:
    logits = torch.randn(2, 10)
    before = logits.clone()
    states = [make_state(outputs=[1, 1], repetition_penalty=2.0, frequency_penalty=1.0)] * 2
    Sampler((EOS,), 10, seed=0).sample(logits, states)
    assert torch.equal(logits, before)


def test_padded_vocabulary_columns_are_never_sampled() -> None:
    logits = torch.zeros(1, 12)
    logits[0, 10:] = 100.0  # padding columns beyond the real vocabulary
    assert Sampler((EOS,), 10).sample(logits, [make_state(temperature=0.0)])[0][0] < 10
    tokens = Sampler((EOS,), 10, seed=0).sample(logits.repeat(200, 1), [make_state()] * 200)
    assert all(token < 10 for token, _, _ in tokens)


def test_bad_shapes_raise_named_errors() -> None:
    sampler = Sampler((EOS,), 10)
    with pytest.raises(SamplerInputError):
        sampler.sample(torch.zeros(2, 10), [make_state()])
    with pytest.raises(SamplerInputError):
        sampler.sample(torch.zeros(1, 8), [make_state()])
    assert sampler.sample(torch.zeros(0, 10), []) == []


def sample_many(logits_row: list[float], trials: int, **params: object) -> list[int]:
    logits = torch.tensor([logits_row]).repeat(trials, 1)
    shared = SamplingParams(**params)
    states = [SequenceSamplingState(shared, [0], 1) for _ in range(trials)]
    return [t for t, _, _ in Sampler((EOS,), len(logits_row), seed=123).sample(logits, states)]


def assert_frequencies_close(tokens: list[int], expected_probs: list[float]) -> None:
    observed = counts_of(tokens, len(expected_probs))
    for count, prob in zip(observed, expected_probs, strict=True):
        # Five standard deviations of a binomial count.
        tolerance = 5 * math.sqrt(len(tokens) * prob * (1 - prob)) + 1
        assert abs(count - len(tokens) * prob) <= tolerance, (observed, expected_probs)


def test_temperature_scales_the_distribution() -> None:
    row = [2.0, 1.0, 0.5, 0.0, -1.0]
    for temperature in (0.5, 1.0, 2.0):
        expected = torch.softmax(torch.tensor(row) / temperature, dim=-1).tolist()
        assert_frequencies_close(sample_many(row, 8000, temperature=temperature), expected)


def test_top_k_keeps_only_the_k_most_likely() -> None:
    row = [0.1, 2.0, 1.5, -0.3, 1.0, 0.7]
    tokens = sample_many(row, 10000, top_k=3)
    assert set(tokens) <= {1, 2, 4}
    kept = torch.tensor([2.0, 1.5, 1.0]).softmax(dim=-1).tolist()
    assert_frequencies_close(tokens, [0.0, kept[0], kept[1], 0.0, kept[2], 0.0])


def test_top_p_keeps_the_nucleus() -> None:
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    row = probs.log().tolist()
    # Mass above token 2 is 0.5 < 0.6, so {1, 2} stay; token 3 has 0.8 above it.
    tokens = sample_many(row, 10000, top_p=0.6)
    assert set(tokens) == {1, 2}
    assert_frequencies_close(tokens, [0.0, 0.5 / 0.8, 0.3 / 0.8, 0.0])
    assert set(sample_many(row, 2000, top_p=0.3)) == {1}  # the top token always stays
    assert set(sample_many(row, 4000, top_p=0.9)) == {1, 2, 3}


def test_top_k_and_top_p_combine() -> None:
    probs = torch.tensor([0.4, 0.3, 0.2, 0.1])
    # top_k=3 leaves [0.4, 0.3, 0.2] / 0.9; top_p=0.75 then keeps tokens whose mass above
    # is < 0.75: 0, 1 (0.444) and not 2 (0.777).
    tokens = sample_many(probs.log().tolist(), 5000, top_k=3, top_p=0.75)
    assert set(tokens) == {0, 1}


def test_min_p_drops_unlikely_tokens() -> None:
    probs = torch.tensor([0.5, 0.3, 0.12, 0.08])
    # Threshold 0.2 * 0.5 = 0.1: token 3 goes.
    tokens = sample_many(probs.log().tolist(), 8000, min_p=0.2)
    assert set(tokens) == {0, 1, 2}
    assert_frequencies_close(tokens, [0.5 / 0.92, 0.3 / 0.92, 0.12 / 0.92, 0.0])


def test_filters_never_sample_outside_the_allowed_set_on_a_large_vocabulary() -> None:
    generator = torch.Generator().manual_seed(7)
    logits = torch.randn(64, 1000, generator=generator) * 3
    params = [dict(top_k=5), dict(top_p=0.3), dict(min_p=0.5), dict(top_k=20, top_p=0.5)]
    states = [make_state(**params[i % 4], temperature=0.7) for i in range(64)]
    sampler = Sampler((EOS,), 1000, seed=0)
    for _ in range(5):
        for row, (token, _, _) in enumerate(sampler.sample(logits, states)):
            scaled = logits[row] / 0.7
            probs = scaled.softmax(dim=-1)
            kind = row % 4
            if kind == 0:
                assert token in scaled.topk(5).indices.tolist()
            elif kind == 1:
                order = probs.argsort(descending=True)
                mass_above = probs[order].cumsum(0) - probs[order]
                assert token in order[mass_above < 0.3].tolist()
            elif kind == 2:
                assert probs[token] >= 0.5 * probs.max()
            else:
                assert token in scaled.topk(20).indices.tolist()


def test_top_p_on_flat_distributions_beyond_the_first_candidates() -> None:
    # Near-uniform rows: the nucleus holds thousands of tokens, more than a partial top-k of
    # the first candidate sizes covers.
    logits = torch.rand(3, 5000, generator=torch.Generator().manual_seed(0)) * 1e-3
    apply_top_k_top_p(logits, [-1, 4200, 100], [0.9, 0.5, 0.5])
    kept = torch.isfinite(logits).sum(dim=-1).tolist()
    assert abs(kept[0] - 4500) <= 2
    assert abs(kept[1] - 2100) <= 2
    assert abs(kept[2] - 50) <= 1


def test_repetition_penalty_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    state = make_state(prompt=[0, 1], outputs=[1, 2], repetition_penalty=2.0)
    apply_penalties(logits, [0], [state])
    # Tokens 0, 1, 2 were seen (token 1 twice, penalised once): positive / 2, negative * 2.
    assert logits.tolist() == [[1.0, -2.0, 0.25, 3.0, -2.0]]


def test_presence_and_frequency_penalties_match_hand_computation() -> None:
    logits = torch.zeros(1, 5)
    state = make_state(
        prompt=[4, 4], outputs=[1, 1, 1, 2], presence_penalty=0.5, frequency_penalty=0.25
    )
    apply_penalties(logits, [0], [state])
    # Prompt tokens do not count; token 1: 3 * 0.25 + 0.5, token 2: 0.25 + 0.5.
    assert logits.tolist() == [[0.0, -1.25, -0.75, 0.0, 0.0]]


def test_penalties_follow_appended_tokens() -> None:
    state = make_state(prompt=[0], outputs=[1], frequency_penalty=1.0)
    logits = torch.zeros(1, 4)
    apply_penalties(logits, [0], [state])
    assert logits.tolist() == [[0.0, -1.0, 0.0, 0.0]]
    state.token_ids += [1, 2]
    logits = torch.zeros(1, 4)
    apply_penalties(logits, [0], [state])
    assert logits.tolist() == [[0.0, -2.0, -1.0, 0.0]]


def test_penalties_change_greedy_choice_only_for_rows_that_ask() -> None:
    logits = torch.tensor([[3.0, 2.0, 0.0], [3.0, 2.0, 0.0]])
    states = [
        make_state(outputs=[0], temperature=0.0, repetition_penalty=2.0),
        make_state(outputs=[0], temperature=0.0),
    ]
    result = Sampler((EOS,), 3).sample(logits, states)
    assert [token for token, _, _ in result] == [1, 0]


def test_min_tokens_masks_eos_and_stop_tokens_until_reached() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 5.0, 4.0]])  # EOS (3) is the argmax, then 4
    sampler = Sampler((EOS,), 5)
    blocked = make_state(outputs=[1], temperature=0.0, min_tokens=2, stop_token_ids=(4,))
    assert sampler.sample(logits, [blocked])[0][0] == 2
    reached = make_state(outputs=[1, 1], temperature=0.0, min_tokens=2, stop_token_ids=(4,))
    assert sampler.sample(logits, [reached])[0][0] == EOS
    # As in vLLM, ignore_eos does not lift the mask on EOS during min_tokens.
    ignoring = make_state(temperature=0.0, min_tokens=2, ignore_eos=True)
    assert sampler.sample(logits, [ignoring])[0][0] == 4


def test_min_tokens_never_samples_eos_when_sampling() -> None:
    logits = torch.tensor([[0.0, 0.0, 0.0, 3.0]]).repeat(500, 1)
    states = [make_state(min_tokens=1) for _ in range(500)]
    tokens = [t for t, _, _ in Sampler((EOS,), 4, seed=0).sample(logits, states)]
    assert EOS not in tokens


def test_logprobs_are_raw_log_softmax_with_top_alternatives() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 1.0]])
    states = [
        make_state(temperature=0.0, logprobs=2, repetition_penalty=2.0, outputs=[1]),
        make_state(temperature=0.0, logprobs=0),
    ]
    result = Sampler((EOS,), 4).sample(logits, states)
    expected = torch.log_softmax(logits, dim=-1)
    token, logprob, top = result[0]
    assert token == 2  # the penalty moved the choice ...
    assert logprob == pytest.approx(expected[0, 2].item())  # ... not the reported logprob
    assert [t.token_id for t in top] == [1, 2]
    assert [t.logprob for t in top] == pytest.approx([expected[0, 1].item(), expected[0, 2].item()])
    token, logprob, top = result[1]
    assert token == 2 and logprob == pytest.approx(expected[1, 2].item()) and top == ()


def test_logprobs_ignore_temperature() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    token, logprob, top = Sampler((EOS,), 3, seed=0).sample(
        logits, [make_state(temperature=0.3, logprobs=3)]
    )[0]
    expected = torch.log_softmax(logits, dim=-1)[0]
    assert logprob == pytest.approx(expected[token].item())
    assert [t.logprob for t in top] == pytest.approx(sorted(expected.tolist(), reverse=True))


def test_seeded_uniform_is_pinned() -> None:
    # Replay on another node must reproduce a seeded sequence: the hash may never change.
    assert seeded_uniform(0, 0) == pytest.approx(0.6524484863740322, abs=0)
    assert seeded_uniform(42, 7) != seeded_uniform(42, 8)
    assert seeded_uniform(-1, 3) == seeded_uniform(2**64 - 1, 3)


def run_seeded(companions: list[SequenceSamplingState], position: int, steps: int) -> list[int]:
    """Generate ``steps`` tokens for one seeded sequence placed among ``companions``."""
    generator = torch.Generator().manual_seed(5)
    step_logits = [torch.randn(40, generator=generator) for _ in range(steps)]
    target = make_state(prompt=[1, 2, 3], seed=1234, top_p=0.9, temperature=0.8)
    sampler = Sampler((EOS,), 40)
    produced = []
    for logits_row in step_logits:
        states = list(companions)
        states.insert(position, target)
        logits = torch.randn(len(states), 40)
        logits[position] = logits_row
        token = sampler.sample(logits, states)[position][0]
        target.token_ids.append(token)
        produced.append(token)
    return produced


def test_seeded_rows_do_not_depend_on_the_batch() -> None:
    alone = run_seeded([], 0, 30)
    crowded = [
        make_state(),
        make_state(seed=9, top_k=3),
        make_state(temperature=0.0, logprobs=3),
        make_state(repetition_penalty=1.3, min_p=0.1, outputs=[5, 6]),
    ]
    assert run_seeded(crowded, 2, 30) == alone
    assert run_seeded(crowded[:1], 1, 30) == alone
    assert len(set(alone)) > 3  # steps draw different numbers


def test_seeded_row_resumes_identically_from_its_output_count() -> None:
    logits = torch.randn(1, 100, generator=torch.Generator().manual_seed(3))
    first = make_state(prompt=[1, 2], outputs=[7, 8, 9], seed=77)
    replayed = make_state(prompt=[1, 2], outputs=[7, 8, 9], seed=77)
    fresh = Sampler((EOS,), 100)  # a different node: a different shared generator
    assert Sampler((EOS,), 100).sample(logits, [first]) == fresh.sample(logits, [replayed])
