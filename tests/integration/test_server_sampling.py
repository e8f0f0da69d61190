"""Sampling controls through the openai SDK on the real model: n, token limits, finish
reasons, and vLLM's extra parameters (passed as ``extra_body``, as vLLM's docs show)."""

from __future__ import annotations

from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletion

from tests.integration.conftest import (
    MODEL,
    LiveServer,
    collect_chat_stream,
    collect_completion_stream,
)

pytestmark = pytest.mark.integration

# The model answers this in a few tokens and then emits its end-of-sequence token.
SHORT_ANSWER: list[dict[str, Any]] = [
    {"role": "user", "content": "What is 2+2? Answer with one number."}
]
STORY: list[dict[str, Any]] = [{"role": "user", "content": "Tell me a story."}]
# Greedy decoding repeats this pattern; a repetition penalty breaks it.
REPEATING_PROMPT = "1, 2, 1, 2, 1, 2, 1, 2,"
SHORT_ANSWER_LIMIT = 40


def _chat(client: openai.OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def _num_tokens(response: ChatCompletion) -> int:
    assert response.usage is not None
    return response.usage.completion_tokens


@pytest.fixture(scope="module")
def short_answer(client: openai.OpenAI) -> ChatCompletion:
    """Greedy; ends on the end-of-sequence token well before the limit."""
    response = _chat(client, SHORT_ANSWER, temperature=0, max_tokens=SHORT_ANSWER_LIMIT)
    assert response.choices[0].finish_reason == "stop", response
    assert 1 < _num_tokens(response) < SHORT_ANSWER_LIMIT - 8, response
    return response


@pytest.fixture(scope="module")
def story_greedy(client: openai.OpenAI) -> str:
    return _chat(client, STORY, temperature=0, max_tokens=10).choices[0].message.content or ""


# -- n > 1 ----------------------------------------------------------------------------------


def test_chat_n_choices_with_exact_usage(live_server: LiveServer, client: openai.OpenAI) -> None:
    response = _chat(client, STORY, n=3, temperature=1.0, max_tokens=8, logprobs=True, seed=13)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    texts = [c.message.content for c in response.choices]
    assert all(texts) and len(set(texts)) > 1, texts
    per_choice = [len(c.logprobs.content) for c in response.choices]  # type: ignore[union-attr]
    assert response.usage is not None
    assert response.usage.completion_tokens == sum(per_choice)
    assert response.usage.prompt_tokens == live_server.count_chat_tokens(STORY)


def test_streamed_chat_n_choices(live_server: LiveServer, client: openai.OpenAI) -> None:
    stream = _chat(
        client,
        STORY,
        n=2,
        temperature=1.0,
        seed=14,  # seeded: no choice may draw the end of the sequence first
        max_tokens=6,
        logprobs=True,
        stream=True,
        stream_options={"include_usage": True},
    )
    streamed = collect_chat_stream(stream)
    assert sorted(streamed.choices) == [0, 1]
    assert all(c.finish_reason is not None and c.text for c in streamed.choices.values())
    assert streamed.usage.completion_tokens == sum(c.num_tokens for c in streamed.choices.values())
    assert streamed.usage.prompt_tokens == live_server.count_chat_tokens(STORY)


def test_streamed_completion_n_choices_with_ignore_eos(client: openai.OpenAI) -> None:
    stream = client.completions.create(
        model=MODEL,
        prompt="Once upon a time",
        n=2,
        temperature=1.0,
        max_tokens=5,
        logprobs=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    streamed = collect_completion_stream(stream)
    assert sorted(streamed.choices) == [0, 1]
    assert [c.num_tokens for c in streamed.choices.values()] == [5, 5]
    assert [c.finish_reason for c in streamed.choices.values()] == ["length", "length"]
    assert streamed.usage.completion_tokens == 10


# -- token limits and finish reasons ------------------------------------------------------


def test_max_tokens_ends_with_length(client: openai.OpenAI) -> None:
    response = _chat(client, SHORT_ANSWER, temperature=0, max_tokens=3)
    assert response.choices[0].finish_reason == "length"
    assert _num_tokens(response) == 3


def test_max_completion_tokens_is_honoured_and_wins(client: openai.OpenAI) -> None:
    response = _chat(client, STORY, temperature=0, max_completion_tokens=4)
    assert response.choices[0].finish_reason == "length"
    assert _num_tokens(response) == 4
    both = _chat(client, STORY, temperature=0, max_completion_tokens=3, max_tokens=7)
    assert _num_tokens(both) == 3


def test_end_of_sequence_ends_with_stop(short_answer: ChatCompletion) -> None:
    (choice,) = short_answer.choices
    assert choice.finish_reason == "stop"
    assert (choice.model_extra or {}).get("stop_reason") is None
    assert choice.message.content and "<|im_end|>" not in choice.message.content


# -- vLLM's extra parameters ----------------------------------------------------------------


def test_ignore_eos_generates_exactly_max_tokens(
    client: openai.OpenAI, short_answer: ChatCompletion
) -> None:
    limit = _num_tokens(short_answer) + 4
    response = _chat(
        client, SHORT_ANSWER, temperature=0, max_tokens=limit, extra_body={"ignore_eos": True}
    )
    assert response.choices[0].finish_reason == "length"
    assert _num_tokens(response) == limit


def test_min_tokens_postpones_the_end(client: openai.OpenAI, short_answer: ChatCompletion) -> None:
    minimum = _num_tokens(short_answer) + 3
    response = _chat(
        client,
        SHORT_ANSWER,
        temperature=0,
        max_tokens=SHORT_ANSWER_LIMIT,
        extra_body={"min_tokens": minimum},
    )
    assert _num_tokens(response) >= minimum
    assert (response.choices[0].message.content or "").startswith(
        short_answer.choices[0].message.content or ""
    )


@pytest.mark.parametrize("extra", [{"top_k": 1}, {"min_p": 1.0}], ids=["top_k", "min_p"])
def test_top_k_and_min_p_narrow_sampling_to_greedy(
    client: openai.OpenAI, story_greedy: str, extra: dict[str, Any]
) -> None:
    unrestricted = _chat(client, STORY, temperature=1.0, max_tokens=10, seed=1)
    assert unrestricted.choices[0].message.content != story_greedy
    # Only the most likely token survives either filter, whatever the seed.
    for seed in (1, 2):
        text = _chat(
            client, STORY, temperature=1.0, max_tokens=10, seed=seed, extra_body=extra
        ).choices[0]
        assert text.message.content == story_greedy


def test_repetition_penalty_changes_a_repeating_answer(client: openai.OpenAI) -> None:
    def complete(**extra: Any) -> str:
        return (
            client.completions.create(
                model=MODEL, prompt=REPEATING_PROMPT, temperature=0, max_tokens=8, extra_body=extra
            )
            .choices[0]
            .text
        )

    plain = complete()
    assert plain.replace(" ", "").startswith("1,2"), plain
    assert complete(repetition_penalty=1.0) == plain
    assert complete(repetition_penalty=2.0) != plain
