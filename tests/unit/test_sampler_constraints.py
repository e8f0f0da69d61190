"""logit_bias, allowed_token_ids, grammar masks and per-row failure isolation in the
sampler."""

from __future__ import annotations

import json

import pytest
import torch

from molink.sampling.sampler import Sampler, SamplerInputError, SequenceSamplingState
from molink.sampling.structured import GrammarCompiler
from molink.sampling_params import SamplingParams, StructuredOutputSpec
from molink.tokenizer.tokenizer import Tokenizer


def state(**params: object) -> SequenceSamplingState:
    return SequenceSamplingState(SamplingParams(**params), [1, 2, 3], 3)


def test_logit_bias_moves_the_greedy_choice() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 4] = 5.0
    states = [state(temperature=0.0, logit_bias=[(7, 100.0)]), state(temperature=0.0)]
    tokens = [t for t, _, _ in Sampler((0,), 10).sample(logits, states)]
    assert tokens == [7, 4]


def test_allowed_token_ids_keep_every_other_token_out() -> None:
    logits = torch.zeros(3, 10)
    logits[:, 4] = 5.0
    logits[:, 6] = 2.0
    states = [
        state(temperature=0.0, allowed_token_ids=[2, 6]),  # 4, the best, is not allowed
        state(temperature=0.0),
        state(temperature=0.0, allowed_token_ids=[2, 6], logprobs=1),
    ]
    results = Sampler((0,), 10).sample(logits, states)
    assert [t for t, _, _ in results] == [6, 4, 6]
    # Logprobs are the raw ones, before the mask (vLLM's raw_logprobs).
    raw = torch.log_softmax(logits[2], dim=-1)
    token, logprob, top = results[2]
    assert logprob == pytest.approx(float(raw[6]))
    assert top[0].token_id == 4  # the best raw alternative, masked out for sampling
    # Sampled rows draw from the allowed ids alone, whatever the logits say.
    sampler = Sampler((0,), 10, seed=0)
    rows = [state(temperature=1.0, allowed_token_ids=[1, 8]) for _ in range(64)]
    drawn = {t for t, _, _ in sampler.sample(torch.randn(64, 10) * 3, rows)}
    assert drawn <= {1, 8} and len(drawn) == 2


def test_allowed_token_ids_beyond_the_logits_are_ignored() -> None:
    # A peer's plan may name ids the API would refuse: the stage must not fail on them.
    logits = torch.zeros(1, 10)
    logits[0, 4] = 5.0
    only_beyond = [state(temperature=0.0, allowed_token_ids=[12])]
    assert Sampler((0,), 10).sample(logits, only_beyond)[0][0] == 4
    some_beyond = [state(temperature=0.0, allowed_token_ids=[3, 12])]
    assert Sampler((0,), 10).sample(logits, some_beyond)[0][0] == 3


def test_bad_words_mask_a_last_token_right_after_the_rest() -> None:
    logits = torch.zeros(4, 10)
    logits[:, 4] = 5.0
    logits[:, 6] = 2.0
    words = [(4,), (2, 6)]  # 4 never; 6 never right after 2
    states = [
        state(temperature=0.0, bad_words_token_ids=words),  # prompt [1, 2, 3]
        state(temperature=0.0, bad_words_token_ids=[(7, 6)]),
        state(temperature=0.0, bad_words_token_ids=[(3, 4)]),
        state(temperature=0.0, bad_words_token_ids=words),
    ]
    states[1].token_ids += [7]  # 7 generated: 6 masked, 4 (the best) not
    states[3].token_ids += [2]  # 2 generated: 6 masked, and 4 always
    # Row 2's prefix is only in the prompt: vLLM looks at generated tokens alone.
    tokens = [t for t, _, _ in Sampler((0,), 10).sample(logits, states)]
    assert tokens == [6, 4, 4, 0]


def test_bad_words_look_at_the_end_of_a_long_output() -> None:
    logits = torch.zeros(2, 10)
    logits[:, 6] = 5.0
    words = ((2, 3, 6), (9,))
    ends = state(temperature=0.0, bad_words_token_ids=words)
    earlier = state(temperature=0.0, bad_words_token_ids=words)
    ends.token_ids += [5] * 300 + [2, 3]  # the prefix ends the output: 6 masked
    earlier.token_ids += [2, 3] + [5] * 300  # the prefix is earlier only: 6 allowed
    tokens = [t for t, _, _ in Sampler((0,), 10).sample(logits, [ends, earlier])]
    assert tokens == [0, 6]


def test_a_failing_row_fails_alone() -> None:
    sampler = Sampler((0,), 10)
    broken = state(temperature=0.0)
    broken.error = "its grammar did not compile"
    results = sampler.sample_isolated(torch.zeros(3, 10), [state(), broken, state()])
    assert isinstance(results[1], Exception) and "grammar" in str(results[1])
    assert all(isinstance(r, tuple) for r in (results[0], results[2]))


@pytest.fixture(scope="module")
def compiler(smollm_dir) -> tuple[GrammarCompiler, Tokenizer]:
    tokenizer = Tokenizer.from_dir(smollm_dir)
    return GrammarCompiler(
        tokenizer.to_json(), tokenizer.vocab_size, tokenizer.eos_token_ids
    ), tokenizer


def test_grammar_masks_force_the_schema(compiler) -> None:
    grammars, tokenizer = compiler
    sampler = Sampler(tokenizer.eos_token_ids, tokenizer.vocab_size, seed=0, grammars=grammars)
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}},
        "required": ["ok"],
        "additionalProperties": False,
    }
    spec = StructuredOutputSpec("json", json.dumps(schema))
    seq = SequenceSamplingState(SamplingParams(structured=spec, max_tokens=50), [1], 1)
    sampler.attach(seq)
    for _ in range(30):  # random logits: only the mask keeps the output valid
        ((token, _, _),) = sampler.sample(torch.randn(1, tokenizer.vocab_size) * 5, [seq])
        if token in tokenizer.eos_token_ids:
            break
        sampler.accept(seq, token)
    assert json.loads(tokenizer.decode(seq.token_ids[1:])) in ({"ok": True}, {"ok": False})
    assert grammars.num_compiled == 1
    sampler.attach(SequenceSamplingState(SamplingParams(structured=spec), [1], 1))
    assert grammars.num_compiled == 1  # the second sequence reuses the compiled grammar


def test_bitmask_layout_and_row_subsets() -> None:
    from molink.sampling.structured import apply_bitmask

    masks = torch.tensor([[0b101, -(2**31)], [-1, 0]], dtype=torch.int32)  # -(2**31): bit 31
    logits = torch.zeros(3, 60)
    apply_bitmask(logits, [0, 2], masks)
    # Row 0 allows tokens 0 and 2 (word 0) and 63 (word 1, bit 31), which is past the vocab.
    assert (logits[0] == 0).nonzero().flatten().tolist() == [0, 2]
    assert bool((logits[1] == 0).all())  # an unconstrained row is left alone
    assert (logits[2] == 0).nonzero().flatten().tolist() == list(range(32))


def test_a_gbnf_grammar_is_enforced(compiler) -> None:
    grammars, tokenizer = compiler
    sampler = Sampler(tokenizer.eos_token_ids, tokenizer.vocab_size, seed=1, grammars=grammars)
    spec = StructuredOutputSpec("grammar", 'root ::= ("yes" | "no") "!"')
    for seed in range(3):
        seq = SequenceSamplingState(SamplingParams(structured=spec, seed=seed), [1], 1)
        sampler.attach(seq)
        for _ in range(10):
            logits = torch.randn(1, tokenizer.vocab_size) * 5
            ((token, _, _),) = sampler.sample(logits, [seq])
            if token in tokenizer.eos_token_ids:
                break
            sampler.accept(seq, token)
        assert tokenizer.decode(seq.token_ids[1:]) in ("yes!", "no!")


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_a_row_left_without_tokens_fails_alone_naming_why(temperature: float) -> None:
    """allowed_token_ids holding only the end-of-sequence id, which min_tokens holds back:
    nothing may be sampled. Greedy would take token 0 and sampling would draw from NaNs;
    that request fails instead, and the others in the batch are sampled."""
    logits = torch.zeros(2, 10)
    logits[:, 4] = 5.0
    states = [
        state(temperature=temperature, allowed_token_ids=[0], min_tokens=2),
        state(temperature=0.0),
    ]
    results = Sampler((0,), 10, seed=0).sample_isolated(logits, states)
    assert isinstance(results[0], SamplerInputError)
    assert "no token can be sampled: allowed_token_ids, min_tokens" in str(results[0])
    assert results[1][0] == 4
    # Once min_tokens are out, the same row samples its one allowed id.
    done = SequenceSamplingState(SamplingParams(allowed_token_ids=[0], min_tokens=2), [1, 5, 6], 1)
    assert Sampler((0,), 10).sample(logits[:1], [done])[0][0] == 0
