"""What ``LLM.generate`` hands back is the caller's own, shaped as vLLM returns it."""

from __future__ import annotations

from dataclasses import replace

import pytest

from molink.engine.offline import LLM
from molink.errors import ContextLengthExceededError
from molink.sampling_params import SamplingParams


def test_generate_returns_the_prompt_as_a_list_of_its_own(tiny_model_dir) -> None:
    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=32)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    (output,) = llm.generate([[5, 6, 7]], params)
    assert output.prompt_token_ids == [5, 6, 7]
    output.prompt_token_ids.append(8)  # a list of its own: changing it touches nothing else
    (again,) = llm.generate([[5, 6, 7]], params)
    assert again.prompt_token_ids == [5, 6, 7]
    assert again.outputs[0].token_ids == output.outputs[0].token_ids


def test_a_stop_string_ending_on_the_last_allowed_token_is_a_stop(tiny_model_dir) -> None:
    """As in vLLM: the stop string wins over max_tokens reached by the same token (the text
    was cut at the stop string but reported as finish_reason "length")."""
    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=32)
    greedy = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    text = llm.generate([[5, 6, 7]], greedy)[0].outputs[0].text
    shorter = llm.generate([[5, 6, 7]], replace(greedy, max_tokens=15))[0].outputs[0].text
    stop = text[len(shorter) :]  # what the last token adds
    assert stop and text == shorter + stop and stop not in shorter
    (output,) = llm.generate([[5, 6, 7]], replace(greedy, stop=[stop]))
    choice = output.outputs[0]
    assert (choice.text, choice.finish_reason, choice.stop_reason) == (shorter, "stop", stop)
    assert len(choice.token_ids) == 16


def test_a_refused_prompt_leaves_no_request_of_the_call_behind(tiny_model_dir) -> None:
    """As in vLLM: when one prompt of a call is refused, the call's prompts already queued
    are dropped, so a later call neither computes them nor waits for them."""
    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=32)
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True)
    too_long = [5] * llm.max_model_len
    with pytest.raises(ContextLengthExceededError):
        llm.generate([[5, 6, 7], too_long], params)
    assert not llm.engine.has_unfinished_requests()
    kv = llm.engine.scheduler.kv
    assert kv.num_free_blocks == kv.num_total_blocks
    (output,) = llm.generate([[8, 9]], params)
    assert output.prompt_token_ids == [8, 9] and len(output.outputs[0].token_ids) == 3
