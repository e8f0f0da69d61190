"""The official openai SDK (sync and async) against a real ``molink serve`` with the real model.

Greedy reference answers are computed once per module and compared with streamed, async and
parameter-varied requests, so each check costs at most one extra generation.
"""

from __future__ import annotations

import asyncio
from typing import Any

import openai
import pytest
from openai.types import Completion
from openai.types.chat import ChatCompletion

from tests.integration.conftest import (
    MAX_MODEL_LEN,
    MODEL,
    LiveServer,
    Streamed,
    collect_chat_stream,
    collect_completion_stream,
)

pytestmark = pytest.mark.integration

CHAT_MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Name three colors of the rainbow."},
]
STORY_MESSAGES: list[dict[str, Any]] = [{"role": "user", "content": "Tell me a story."}]
PROMPT = "San Francisco is a"
NUM_TOKENS = 16
NUM_TOP = 3


async def _drain(stream: Any) -> list[Any]:
    return [chunk async for chunk in stream]


def _chat(client: openai.OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> ChatCompletion:
    return client.chat.completions.create(model=MODEL, messages=messages, **kwargs)


def _chat_text(client: openai.OpenAI, messages: list[dict[str, Any]], **kwargs: Any) -> str:
    return _chat(client, messages, **kwargs).choices[0].message.content or ""


def _complete(client: openai.OpenAI, prompt: str = PROMPT, **kwargs: Any) -> Completion:
    return client.completions.create(model=MODEL, prompt=prompt, **kwargs)


def _greedy_chat_kwargs() -> dict[str, Any]:
    return {"temperature": 0, "max_tokens": NUM_TOKENS, "logprobs": True, "top_logprobs": NUM_TOP}


def _greedy_completion_kwargs() -> dict[str, Any]:
    return {"temperature": 0, "max_tokens": NUM_TOKENS, "logprobs": NUM_TOP}


# -- module references ------------------------------------------------------------------


@pytest.fixture(scope="module")
def chat_reference(client: openai.OpenAI) -> ChatCompletion:
    return _chat(client, CHAT_MESSAGES, **_greedy_chat_kwargs())


@pytest.fixture(scope="module")
def chat_stream_reference(client: openai.OpenAI) -> Streamed:
    stream = _chat(
        client,
        CHAT_MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        **_greedy_chat_kwargs(),
    )
    return collect_chat_stream(stream)


@pytest.fixture(scope="module")
def completion_reference(client: openai.OpenAI) -> Completion:
    return _complete(client, **_greedy_completion_kwargs())


@pytest.fixture(scope="module")
def completion_stream_reference(client: openai.OpenAI) -> Streamed:
    stream = _complete(
        client, stream=True, stream_options={"include_usage": True}, **_greedy_completion_kwargs()
    )
    return collect_completion_stream(stream)


# -- models -----------------------------------------------------------------------------


def test_models_are_listed(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]
    assert models[0].object == "model"
    assert (models[0].model_extra or {}).get("max_model_len") == MAX_MODEL_LEN
    assert client.models.retrieve(MODEL).id == MODEL


async def test_models_are_listed_async(async_client: openai.AsyncOpenAI) -> None:
    page = await async_client.models.list()
    assert [m.id for m in page.data] == [MODEL]
    assert (await async_client.models.retrieve(MODEL)).id == MODEL


# -- usage, streaming, logprobs -----------------------------------------------------------


def test_chat_usage_is_exact(live_server: LiveServer, chat_reference: ChatCompletion) -> None:
    usage = chat_reference.usage
    assert usage is not None
    (choice,) = chat_reference.choices
    assert choice.message.role == "assistant"
    assert choice.message.content
    assert usage.prompt_tokens == live_server.count_chat_tokens(CHAT_MESSAGES)
    assert choice.logprobs is not None and choice.logprobs.content is not None
    assert usage.completion_tokens == len(choice.logprobs.content)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_chat_usage_counts_the_streamed_tokens(
    live_server: LiveServer, chat_stream_reference: Streamed
) -> None:
    usage = chat_stream_reference.usage
    assert chat_stream_reference.num_usage_chunks == 1
    (choice,) = chat_stream_reference.choices.values()
    assert usage.prompt_tokens == live_server.count_chat_tokens(CHAT_MESSAGES)
    assert usage.completion_tokens == choice.num_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_chat_stream_equals_non_stream(
    chat_reference: ChatCompletion, chat_stream_reference: Streamed
) -> None:
    (choice,) = chat_reference.choices
    (streamed,) = chat_stream_reference.choices.values()
    assert streamed.text == choice.message.content
    assert streamed.finish_reason == choice.finish_reason
    assert chat_reference.usage is not None
    assert chat_stream_reference.usage.completion_tokens == chat_reference.usage.completion_tokens


def test_completion_usage_is_exact(
    live_server: LiveServer, completion_reference: Completion
) -> None:
    usage = completion_reference.usage
    assert usage is not None
    (choice,) = completion_reference.choices
    assert usage.prompt_tokens == live_server.count_prompt_tokens(PROMPT)
    assert choice.logprobs is not None and choice.logprobs.tokens is not None
    assert usage.completion_tokens == len(choice.logprobs.tokens) == NUM_TOKENS
    assert choice.finish_reason == "length"
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_streamed_completion_matches_non_stream(
    live_server: LiveServer, completion_reference: Completion, completion_stream_reference: Streamed
) -> None:
    (choice,) = completion_reference.choices
    (streamed,) = completion_stream_reference.choices.values()
    assert streamed.text == choice.text
    assert streamed.finish_reason == choice.finish_reason == "length"
    usage = completion_stream_reference.usage
    assert completion_stream_reference.num_usage_chunks == 1
    assert usage.prompt_tokens == live_server.count_prompt_tokens(PROMPT)
    assert usage.completion_tokens == streamed.num_tokens == NUM_TOKENS


def test_chat_logprobs(chat_reference: ChatCompletion) -> None:
    (choice,) = chat_reference.choices
    assert choice.logprobs is not None and choice.logprobs.content
    for entry in choice.logprobs.content:
        assert entry.logprob <= 0.0
        assert entry.bytes == list(entry.token.encode("utf-8"))
        assert len(entry.top_logprobs) == NUM_TOP
        top = [alt.logprob for alt in entry.top_logprobs]
        assert top == sorted(top, reverse=True)
        # Greedy: the chosen token is the most likely one.
        assert entry.token == entry.top_logprobs[0].token
        assert entry.logprob == pytest.approx(top[0], abs=1e-4)
    text_tokens = [e.token for e in choice.logprobs.content]
    if choice.finish_reason == "stop":  # the end-of-sequence token has no text
        text_tokens = text_tokens[:-1]
    assert "".join(text_tokens) == choice.message.content


def test_completion_logprobs(completion_reference: Completion) -> None:
    (choice,) = completion_reference.choices
    logprobs = choice.logprobs
    assert logprobs is not None and logprobs.tokens and logprobs.token_logprobs
    assert logprobs.top_logprobs is not None and logprobs.text_offset is not None
    assert "".join(logprobs.tokens) == choice.text
    assert all(lp <= 0.0 for lp in logprobs.token_logprobs)
    for token, logprob, top in zip(
        logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
    ):
        assert NUM_TOP <= len(top) <= NUM_TOP + 1
        assert top[token] == pytest.approx(logprob, abs=1e-4)
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy
    offsets = [0]
    for token in logprobs.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert logprobs.text_offset == offsets


async def test_async_sdk_chat_matches_sync(
    async_client: openai.AsyncOpenAI,
    chat_reference: ChatCompletion,
    chat_stream_reference: Streamed,
) -> None:
    response, stream = await asyncio.gather(
        async_client.chat.completions.create(
            model=MODEL, messages=CHAT_MESSAGES, **_greedy_chat_kwargs()
        ),
        async_client.chat.completions.create(
            model=MODEL,
            messages=CHAT_MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
            **_greedy_chat_kwargs(),
        ),
    )
    streamed = collect_chat_stream(await _drain(stream))
    expected = chat_reference.choices[0].message.content
    assert response.choices[0].message.content == expected
    assert streamed.choices[0].text == expected
    assert response.usage == chat_reference.usage
    assert streamed.usage == chat_stream_reference.usage


async def test_async_sdk_completions_match_sync(
    async_client: openai.AsyncOpenAI, completion_reference: Completion
) -> None:
    response = await async_client.completions.create(
        model=MODEL, prompt=PROMPT, **_greedy_completion_kwargs()
    )
    stream = await async_client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        stream=True,
        stream_options={"include_usage": True},
        **_greedy_completion_kwargs(),
    )
    streamed = collect_completion_stream(await _drain(stream))
    assert response.choices[0].text == completion_reference.choices[0].text
    assert streamed.choices[0].text == completion_reference.choices[0].text
    assert response.usage == completion_reference.usage
    assert streamed.usage == completion_reference.usage


# -- stop strings -------------------------------------------------------------------------


def _stop_word(text: str) -> tuple[str, int]:
    """A word from the middle of a greedy answer, and where it first appears."""
    words = text.split()
    assert len(words) >= 3, text
    stop = " " + words[len(words) // 2]
    where = text.find(stop)
    assert where > 0, (text, stop)
    return stop, where


def test_completion_stop_string_truncates(
    client: openai.OpenAI, completion_reference: Completion
) -> None:
    full = completion_reference.choices[0].text
    stop, where = _stop_word(full)
    (choice,) = _complete(client, temperature=0, max_tokens=NUM_TOKENS, stop=[stop]).choices
    assert choice.text == full[:where]
    assert choice.finish_reason == "stop"
    assert (choice.model_extra or {}).get("stop_reason") == stop


def test_completion_include_stop_str_in_output(
    client: openai.OpenAI, completion_reference: Completion
) -> None:
    full = completion_reference.choices[0].text
    stop, where = _stop_word(full)
    (choice,) = _complete(
        client,
        temperature=0,
        max_tokens=NUM_TOKENS,
        stop=stop,
        extra_body={"include_stop_str_in_output": True},
    ).choices
    assert choice.text == full[: where + len(stop)]
    assert choice.finish_reason == "stop"


def test_streamed_chat_stop_string_truncates(
    client: openai.OpenAI, chat_reference: ChatCompletion
) -> None:
    full = chat_reference.choices[0].message.content or ""
    stop, where = _stop_word(full)
    stream = _chat(
        client,
        CHAT_MESSAGES,
        temperature=0,
        max_tokens=NUM_TOKENS,
        stop=[stop, "never-generated-stop"],
        stream=True,
    )
    (streamed,) = collect_chat_stream(stream).choices.values()
    assert streamed.text == full[:where]
    assert streamed.finish_reason == "stop"
    assert streamed.extras.get("stop_reason") == stop


def test_chat_stop_string_truncates(client: openai.OpenAI, chat_reference: ChatCompletion) -> None:
    full = chat_reference.choices[0].message.content or ""
    stop, where = _stop_word(full)
    (choice,) = _chat(
        client, CHAT_MESSAGES, temperature=0, max_tokens=NUM_TOKENS, stop=stop
    ).choices
    assert choice.message.content == full[:where]
    assert choice.finish_reason == "stop"


# -- seeds ----------------------------------------------------------------------------------


def _seeded(client: openai.OpenAI, seed: int) -> str:
    return _chat_text(client, STORY_MESSAGES, temperature=1.0, max_tokens=12, seed=seed)


def test_same_seed_same_text_different_seed_different_text(client: openai.OpenAI) -> None:
    first = _seeded(client, 1234)
    assert first
    assert _seeded(client, 1234) == first
    assert _seeded(client, 4321) != first


async def test_seed_is_reproducible_inside_a_concurrent_batch(
    client: openai.OpenAI, async_client: openai.AsyncOpenAI
) -> None:
    alone = _seeded(client, 77)

    async def one(seed: int | None, messages: list[dict[str, Any]]) -> str:
        response = await async_client.chat.completions.create(
            model=MODEL, messages=messages, temperature=1.0, max_tokens=12, seed=seed
        )
        return response.choices[0].message.content or ""

    others = [
        [{"role": "user", "content": f"Write a line about the number {i}."}] for i in range(4)
    ]
    results = await asyncio.gather(
        one(77, STORY_MESSAGES),
        *(one(None, messages) for messages in others),
        one(77, STORY_MESSAGES),
    )
    assert results[0] == alone
    assert results[-1] == alone


def test_completion_seed_is_reproducible(client: openai.OpenAI) -> None:
    def sample(seed: int) -> str:
        response = _complete(client, "Once upon a time", temperature=1.0, max_tokens=12, seed=seed)
        return response.choices[0].text

    first = sample(5)
    assert sample(5) == first
    assert sample(6) != first
