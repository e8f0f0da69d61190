"""The whole engine (scheduler + paged KV + stages + sampler) against transformers.

Unlike the model-level tests, these go through continuous batching, chunked prefill under
a small token budget, prefix-cache hits between requests, preemption when blocks run out,
and several in-process layer ranges handing hidden states across.
"""

from __future__ import annotations

import pytest
import torch

from molink.engine.offline import LLM
from molink.sampling_params import SamplingParams
from tests.helpers.tiny_models import load_reference_model

NEW_TOKENS = 16
LOGPROB_TOLERANCE = 1e-4


def _prompts(vocab: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    shared = torch.randint(3, vocab, (40,), generator=generator).tolist()
    return [
        shared + [5, 6, 7],  # shares 40 tokens (2+ full blocks) with the next one
        shared + [9],
        torch.randint(3, vocab, (3,), generator=generator).tolist(),
        torch.randint(3, vocab, (71,), generator=generator).tolist(),  # several chunks
    ]


def _reference(path, prompts: list[list[int]]) -> list[tuple[list[int], list[torch.Tensor]]]:
    """Greedy tokens and the log-softmax at every step, one prompt at a time."""
    model = load_reference_model(path)
    references = []
    with torch.no_grad():
        for prompt in prompts:
            out = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_logits=True,
                return_dict_in_generate=True,
                eos_token_id=None,
                pad_token_id=0,
            )
            tokens = out.sequences[0, len(prompt) :].tolist()
            logprobs = [torch.log_softmax(step[0].float(), -1) for step in out.logits]
            references.append((tokens, logprobs))
    return references


def _check_against_reference(outputs, references) -> None:
    for output, (tokens, logprobs) in zip(outputs, references, strict=True):
        completion = output.outputs[0]
        assert completion.token_ids == tokens
        for step, token in enumerate(tokens):
            expected = logprobs[step]
            assert abs(completion.logprobs[step] - expected[token].item()) <= LOGPROB_TOLERANCE
            for alternative in completion.top_logprobs[step]:
                got, want = alternative.logprob, expected[alternative.token_id].item()
                assert abs(got - want) <= LOGPROB_TOLERANCE


GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=3)


@pytest.mark.parametrize("arch", ["llama", "llama3", "llama_tied", "mistral", "qwen2", "qwen3"])
@pytest.mark.parametrize("layer_splits", [None, [1], [1, 3]], ids=["1", "2", "3"])
def test_engine_matches_transformers(tiny_model_dir, arch, layer_splits) -> None:
    path = tiny_model_dir(arch)
    llm = LLM(
        model=str(path),
        dtype="float32",
        layer_splits=layer_splits,
        block_size=16,
        num_kv_blocks=64,
        max_num_batched_tokens=32,  # forces chunked prefill alongside decodes
    )
    prompts = _prompts(llm.engine.tokenizer.vocab_size)
    outputs = llm.generate(prompts, GREEDY)
    _check_against_reference(outputs, _reference(path, prompts))
    llm.engine.scheduler.kv.check_integrity()
    assert llm.engine.scheduler.kv.num_free_blocks == llm.engine.scheduler.kv.num_total_blocks


def test_prefix_cache_is_hit_and_output_unchanged(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen3")
    llm = LLM(model=str(path), dtype="float32", block_size=16, num_kv_blocks=64)
    prompts = _prompts(llm.engine.tokenizer.vocab_size)
    first = llm.generate([prompts[0]], GREEDY)[0]
    second = llm.generate([prompts[0]], GREEDY)[0]  # whole prompt cached but the last token
    assert second.outputs[0].token_ids == first.outputs[0].token_ids
    stats = llm.engine.scheduler.kv
    assert stats.num_free_blocks == stats.num_total_blocks
    _check_against_reference([second], _reference(path, [prompts[0]]))


def test_preemption_keeps_outputs_exact(tiny_model_dir) -> None:
    path = tiny_model_dir("llama")
    # 12 blocks of 8 tokens cannot hold four sequences of ~60 tokens: the scheduler must
    # preempt and recompute, and the outputs must not change.
    llm = LLM(
        model=str(path), dtype="float32", block_size=8, num_kv_blocks=12, max_num_batched_tokens=64
    )
    prompts = [p[:40] for p in _prompts(llm.engine.tokenizer.vocab_size)]
    outputs = llm.generate(prompts, GREEDY)
    _check_against_reference(outputs, _reference(path, prompts))


def test_seed_gives_same_output_whatever_the_batch(tiny_model_dir) -> None:
    llm = LLM(model=str(tiny_model_dir("qwen2")), dtype="float32", num_kv_blocks=64)
    prompts = _prompts(llm.engine.tokenizer.vocab_size)
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate([prompts[1]], seeded)[0].outputs[0].token_ids
    unseeded = SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True)
    batch = llm.generate(prompts, [unseeded, seeded, unseeded, unseeded])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = llm.generate([prompts[1]], seeded.with_seed(99))[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_sequences_share_the_prompt(tiny_model_dir) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", block_size=16, num_kv_blocks=64)
    prompt = _prompts(llm.engine.tokenizer.vocab_size)[3]
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)
    output = llm.generate([prompt], params)[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 8 for c in output.outputs)
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks
