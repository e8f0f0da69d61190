"""The app under a real uvicorn on 127.0.0.1: the official openai SDK, disconnects, shutdown."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from molink.api import ApiConfig, create_app
from tests.helpers.fake_engine import DEFAULT_SCRIPT, FakeEngine, FakeEngineOptions
from tests.helpers.server_process import ThreadedServer, port_is_free

API_KEY = "sk-live-test"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return predicate()


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def server(engine: FakeEngine) -> Iterator[ThreadedServer]:
    with ThreadedServer(create_app(engine, ApiConfig(api_key=API_KEY))) as running:
        yield running


@pytest.fixture
def sdk(server: ThreadedServer) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=10.0
    )


def test_sdk_models_and_chat(sdk: openai.OpenAI) -> None:
    (model,) = sdk.models.list().data
    assert model.id == "fake-model"
    response = sdk.chat.completions.create(
        model="fake-model", messages=MESSAGES, temperature=0.7, max_tokens=5
    )
    assert response.id.startswith("chatcmpl-")
    assert response.choices[0].message.content == DEFAULT_SCRIPT[:5]
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].finish_reason == "length"
    assert response.usage is not None and response.usage.completion_tokens == 5


def test_sdk_chat_logprobs_and_extra_body(sdk: openai.OpenAI) -> None:
    response = sdk.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        max_completion_tokens=2,
        logprobs=True,
        top_logprobs=2,
        n=2,
        seed=1,
        stop=["\n"],
        extra_body={"top_k": 3, "repetition_penalty": 1.1},
    )
    assert len(response.choices) == 2
    content = response.choices[0].logprobs.content
    assert [entry.token for entry in content] == ["H", "e"]
    assert content[0].top_logprobs[1].logprob == -2.0


def test_sdk_chat_stream_with_usage(sdk: openai.OpenAI) -> None:
    stream = sdk.chat.completions.create(
        model="fake-model",
        messages=MESSAGES,
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == DEFAULT_SCRIPT[:4]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "length"


def test_sdk_completions(sdk: openai.OpenAI) -> None:
    response = sdk.completions.create(model="fake-model", prompt="Hi", max_tokens=3, logprobs=1)
    assert response.choices[0].text == DEFAULT_SCRIPT[:3]
    assert response.choices[0].logprobs.tokens == list(DEFAULT_SCRIPT[:3])
    assert response.usage.prompt_tokens == 3
    stream = sdk.completions.create(
        model="fake-model", prompt=["a", "b"], max_tokens=2, stream=True
    )
    texts: dict[int, str] = {}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
    assert texts == {0: "He", 1: "He"}


def test_sdk_errors(sdk: openai.OpenAI, server: ThreadedServer) -> None:
    with pytest.raises(openai.NotFoundError) as not_found:
        sdk.chat.completions.create(model="nope", messages=MESSAGES)
    assert not_found.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as bad:
        sdk.chat.completions.create(model="fake-model", messages=MESSAGES, temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.BadRequestError) as too_long:
        sdk.completions.create(model="fake-model", prompt="x" * 300)
    assert too_long.value.code == "context_length_exceeded"
    wrong_key = openai.OpenAI(base_url=f"{server.base_url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong_key.models.list()
    assert sdk.models.list().data


def test_sdk_stream_error_event_raises(sdk: openai.OpenAI, engine: FakeEngine) -> None:
    engine.options.fail_after = 2
    stream = sdk.chat.completions.create(
        model="fake-model", messages=MESSAGES, max_tokens=10, stream=True
    )
    with pytest.raises(openai.APIError) as failure:
        list(stream)
    assert "stage 1" in failure.value.message
    engine.options.fail_after = None
    assert sdk.chat.completions.create(model="fake-model", messages=MESSAGES, max_tokens=1)


async def test_async_sdk(server: ThreadedServer) -> None:
    client = openai.AsyncOpenAI(
        base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=10.0
    )
    try:
        response = await client.chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=3
        )
        assert response.choices[0].message.content == DEFAULT_SCRIPT[:3]
        stream = await client.chat.completions.create(
            model="fake-model", messages=MESSAGES, max_tokens=3, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert text == DEFAULT_SCRIPT[:3]
        completion = await client.completions.create(model="fake-model", prompt="a", max_tokens=2)
        assert completion.choices[0].text == DEFAULT_SCRIPT[:2]
    finally:
        await client.close()


@pytest.fixture
def slow_engine() -> FakeEngine:
    return FakeEngine(options=FakeEngineOptions(step_delay=0.05), max_model_len=1024)


@pytest.fixture
def slow_server(slow_engine: FakeEngine) -> Iterator[ThreadedServer]:
    with ThreadedServer(create_app(slow_engine)) as running:
        yield running


def test_disconnect_mid_stream_aborts(slow_engine: FakeEngine, slow_server: ThreadedServer) -> None:
    body = {"messages": MESSAGES, "max_tokens": 500, "stream": True}
    with httpx.Client(timeout=10.0) as client:
        with client.stream(
            "POST", f"{slow_server.base_url}/v1/chat/completions", json=body
        ) as response:
            data = []
            for line in response.iter_lines():
                if line.startswith("data: "):
                    data.append(line)
                if len(data) >= 3:
                    break
    request_id = json.loads(data[0][len("data: ") :])["id"]
    assert wait_until(lambda: request_id in slow_engine.abort_calls)
    assert wait_until(lambda: not slow_engine.active)
    assert request_id in slow_engine.cancelled


def test_disconnect_of_non_streamed_request_aborts(
    slow_engine: FakeEngine, slow_server: ThreadedServer
) -> None:
    body = {"prompt": "Hi", "max_tokens": 500}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{slow_server.base_url}/v1/completions", json=body, timeout=0.5)
    assert wait_until(lambda: len(slow_engine.abort_calls) == 1)
    assert wait_until(lambda: not slow_engine.active)
    metrics = httpx.get(f"{slow_server.base_url}/metrics").text
    assert 'molink:request_success_total{finished_reason="abort",model_name="fake-model"} 1' in (
        metrics
    )


def test_shutdown_ends_running_streams_with_an_error(slow_engine: FakeEngine) -> None:
    app = create_app(slow_engine)
    running = ThreadedServer(app)
    with running:
        body = {"prompt": "Hi", "max_tokens": 500, "stream": True}
        with httpx.Client(timeout=10.0) as client:
            with client.stream("POST", f"{running.base_url}/v1/completions", json=body) as response:
                payloads = []
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    payloads.append(line[len("data: ") :])
                    if len(payloads) == 2:
                        running.server.should_exit = True
    assert payloads[-1] == "[DONE]"
    error = json.loads(payloads[-2])["error"]
    assert "shutting down" in error["message"]
    assert wait_until(lambda: not slow_engine.active)
    assert slow_engine.abort_calls
    assert wait_until(lambda: port_is_free(running.port))


class _NeverStarts(FakeEngine):
    """Takes requests but never gives their first output (as if queued behind others)."""

    async def _generate(self, request_id, prompt, params):
        self.submitted.append((request_id, prompt, params))
        self.active.add(request_id)
        try:
            await asyncio.Event().wait()
        finally:
            self.active.discard(request_id)
        yield  # an async generator that never gets here


@pytest.mark.parametrize("stream", [False, True])
def test_shutdown_answers_requests_still_waiting_for_their_first_output(stream: bool) -> None:
    """They waited out uvicorn's graceful timeout and lost their connection, no answer."""
    engine = _NeverStarts()
    running = ThreadedServer(create_app(engine))
    answers: list[httpx.Response | Exception] = []

    def post() -> None:
        body = {"prompt": "Hi", "max_tokens": 5, "stream": stream}
        try:
            answers.append(httpx.post(f"{running.base_url}/v1/completions", json=body, timeout=20))
        except Exception as exc:
            answers.append(exc)

    with running:
        waiting = threading.Thread(target=post)
        waiting.start()
        assert wait_until(lambda: engine.submitted)
        running.server.should_exit = True
        waiting.join(timeout=20)
    (answer,) = answers
    assert isinstance(answer, httpx.Response), answer
    assert answer.status_code == 503
    assert "shutting down" in answer.json()["error"]["message"]
    assert wait_until(lambda: not engine.active)
    assert engine.abort_calls
