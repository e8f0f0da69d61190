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


def test_finished_only_steps_emit_each_request_once_with_all_it_made(tiny_model_dir) -> None:
    """vLLM's FINAL_ONLY, which ``LLM.generate`` uses: no per-step copies of unfinished
    requests; the one output is the same as the last of the every-step outputs, with every
    token and the whole text as its delta."""
    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", num_kv_blocks=64)
    params = [
        SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True, logprobs=1) for n in (3, 9)
    ]

    def run(finished_only: bool) -> list[list]:
        for i, p in enumerate(params):
            llm.engine.add_request(f"{finished_only}-{i}", [5, 6, 7, i], p)
        steps = []
        while llm.engine.has_unfinished_requests():
            steps.append(llm.engine.step(finished_only=finished_only))
        return steps

    every = [out for step in run(False) for out in step]
    only = [out for step in run(True) for out in step]
    assert len(only) == 2 and all(out.finished for out in only)
    assert len(every) > 2  # the same requests, copied out on each step
    for i, final in enumerate(sorted(only, key=lambda o: o.request_id)):
        last = [o for o in every if o.request_id == f"False-{i}"][-1]
        (mine,), (theirs,) = final.outputs, last.outputs
        assert mine.token_ids == theirs.token_ids and len(mine.token_ids) == (3, 9)[i]
        assert mine.text == theirs.text and mine.logprobs == theirs.logprobs
        assert mine.delta_token_ids == mine.token_ids  # nothing was sent before
        assert mine.delta_text == mine.text
