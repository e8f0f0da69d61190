"""Bad input gets a named error that says what is wrong and what is allowed, and the engine
keeps serving the other requests."""

from __future__ import annotations

import pytest

from molink.engine.offline import LLM
from molink.errors import (
    ContextLengthExceededError,
    InvalidParameterError,
    UnsupportedArchitectureError,
)
from molink.models.registry import resolve_architecture
from molink.sampling_params import SamplingParams


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("max_tokens", 0, "[1, "),
        ("top_p", 0.0, "(0, 1]"),
        ("top_p", 1.5, "(0, 1]"),
        ("temperature", -0.5, "[0, 2]"),
        ("temperature", 2.5, "[0, 2]"),
        ("top_k", -3, "-1"),
        ("min_p", 2.0, "[0, 1]"),
        ("n", 0, "[1, 128]"),
        ("logprobs", 2000, "[0, 1024]"),
        ("prompt_logprobs", 50, "[0, 20]"),
        ("presence_penalty", 3.0, "[-2, 2]"),
        ("repetition_penalty", 0.0, "(0, 10]"),
    ],
)
def test_sampling_params_name_the_field_and_range(field, value, allowed) -> None:
    with pytest.raises(InvalidParameterError) as info:
        SamplingParams(**{field: value})
    assert info.value.field == field
    assert allowed in str(info.value)


def test_unknown_architecture_lists_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        resolve_architecture(["GPTNeoXForCausalLM"])
    message = str(info.value)
    assert "GPTNeoXForCausalLM" in message
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in message


@pytest.fixture(scope="module")
def small_llm(tiny_model_dir) -> LLM:
    return LLM(
        model=str(tiny_model_dir("llama")), dtype="float32", max_model_len=64, num_kv_blocks=32
    )


def test_prompt_longer_than_context_fails_and_others_are_served(small_llm) -> None:
    engine = small_llm.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    engine.add_request("good-1", [5, 6, 7], params)
    with pytest.raises(ContextLengthExceededError) as info:
        engine.add_request("too-long", list(range(3, 3 + 80)), params)
    assert "64" in str(info.value)
    with pytest.raises(ContextLengthExceededError):
        engine.add_request("too-long-total", [5] * 40, SamplingParams(max_tokens=40))
    engine.add_request("good-2", [8, 9], params)
    finished = {}
    for _ in range(100):
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
        if not engine.has_unfinished_requests():
            break
    assert sorted(finished) == ["good-1", "good-2"]
    assert all(len(o.outputs[0].token_ids) == 4 for o in finished.values())
    kv = engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks
    kv.check_integrity()


def test_empty_prompt_is_rejected(small_llm) -> None:
    with pytest.raises(InvalidParameterError) as info:
        small_llm.engine.add_request("empty", [], SamplingParams())
    assert info.value.field == "prompt"


def test_token_ids_outside_the_vocabulary_are_refused_and_others_are_served(small_llm) -> None:
    """A token id the embedding has no row for used to fail the step (an IndexError),
    and with it every request in the batch."""
    engine = small_llm.engine
    vocab = small_llm.engine.executor.stages[0].model.config.vocab_size  # the embedding's rows
    assert engine.vocab_size == vocab
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("good", [5, 6, 7], params)
    for bad in ([5, vocab], [5, -1], [5, 2.0]):
        with pytest.raises(InvalidParameterError) as info:
            engine.add_request("bad", bad, params)
        assert info.value.field == "prompt" and f"[0, {vocab})" in str(info.value)
    with pytest.raises(InvalidParameterError):
        small_llm.generate([[1, vocab + 10]], params)
    (output,) = small_llm.generate([[8, 9]], params)
    assert len(output.outputs[0].token_ids) == 3
    assert not engine.has_unfinished_requests()
    kv = engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks


def test_bad_dtype_names_the_choices(tiny_model_dir) -> None:
    with pytest.raises(InvalidParameterError) as info:
        LLM(model=str(tiny_model_dir("llama")), dtype="float8")
    assert info.value.field == "dtype"
    assert "float32" in str(info.value)


def test_max_model_len_beyond_the_model(tiny_model_dir) -> None:
    with pytest.raises(InvalidParameterError) as info:
        LLM(model=str(tiny_model_dir("llama")), max_model_len=10**6)
    assert info.value.field == "max_model_len"
