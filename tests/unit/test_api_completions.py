"""POST /v1/completions against the fake engine: shapes, usage, streaming, parameters."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from tests.helpers.fake_engine import DEFAULT_SCRIPT, FakeEngine, sse_payloads


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine)) as test_client:
        yield test_client


def complete(client: TestClient, **body: object) -> dict:
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_string_prompt_shape_and_usage(client: TestClient) -> None:
    body = complete(client, model="fake-model", prompt="Hi", max_tokens=5)
    assert body["id"].startswith("cmpl-")
    assert body["object"] == "text_completion"
    assert body["model"] == "fake-model"
    assert isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice == {
        "index": 0,
        "text": DEFAULT_SCRIPT[:5],
        "logprobs": None,
        "finish_reason": "length",
        "stop_reason": None,
    }
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}


def test_model_may_be_omitted(client: TestClient) -> None:
    assert complete(client, prompt="Hi", max_tokens=1)["model"] == "fake-model"


def test_default_max_tokens_is_16(client: TestClient) -> None:
    assert complete(client, prompt="Hi")["usage"]["completion_tokens"] == 16


def test_token_prompt(client: TestClient, engine: FakeEngine) -> None:
    body = complete(client, prompt=[75, 108], max_tokens=2)
    assert body["usage"]["prompt_tokens"] == 2
    assert engine.submitted[-1][1] == [75, 108]


def test_several_prompts_times_n(client: TestClient, engine: FakeEngine) -> None:
    body = complete(client, prompt=["a", "bcd"], max_tokens=3, n=2)
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["choices"][1]["text"] == DEFAULT_SCRIPT[1:4]
    assert body["usage"] == {"prompt_tokens": 2 + 4, "completion_tokens": 12, "total_tokens": 18}
    request_ids = [submitted[0] for submitted in engine.submitted]
    assert len(set(request_ids)) == 2
    assert all(rid.startswith(body["id"]) for rid in request_ids)


def test_several_token_prompts(client: TestClient) -> None:
    body = complete(client, prompt=[[75], [75, 108]], max_tokens=1)
    assert len(body["choices"]) == 2
    assert body["usage"]["prompt_tokens"] == 3


def test_add_special_tokens_false_leaves_out_the_bos(
    client: TestClient, engine: FakeEngine
) -> None:
    """vLLM's field; it was accepted and ignored, so the prompt still began with BOS."""
    body = complete(client, prompt=["Hi", "K"], max_tokens=1, echo=True, add_special_tokens=False)
    assert body["usage"]["prompt_tokens"] == 3  # "Hi" and "K", no BOS
    assert [submitted[1] for submitted in engine.submitted[-2:]] == [[75, 108], [78]]
    assert [choice["text"] for choice in body["choices"]] == ["HiH", "KH"]
    assert complete(client, prompt="Hi", max_tokens=1)["usage"]["prompt_tokens"] == 3
    body = {"prompt": "", "max_tokens": 1, "add_special_tokens": False}
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "prompt: must not be empty"


def test_unimplemented_vllm_fields_asking_for_nothing_are_accepted(client: TestClient) -> None:
    off = {"bad_words": [], "allowed_token_ids": None, "use_beam_search": False}
    assert complete(client, prompt="Hi", max_tokens=1, **off)["choices"][0]["text"] == "H"
    off = {"bad_words": None}
    assert complete(client, prompt="Hi", max_tokens=1, **off)["choices"][0]["text"] == "H"


def test_echo(client: TestClient) -> None:
    body = complete(client, prompt="Hi", max_tokens=2, echo=True)
    assert body["choices"][0]["text"] == "Hi" + DEFAULT_SCRIPT[:2]


def test_echo_token_prompt_decodes_the_prompt(client: TestClient) -> None:
    body = complete(client, prompt=[75, 108], max_tokens=1, echo=True)
    assert body["choices"][0]["text"] == "Hi" + DEFAULT_SCRIPT[:1]


def test_logprobs_completions_format(client: TestClient) -> None:
    body = complete(client, prompt="Hi", max_tokens=3, logprobs=2)
    logprobs = body["choices"][0]["logprobs"]
    assert logprobs["tokens"] == list(DEFAULT_SCRIPT[:3])
    assert logprobs["token_logprobs"] == [-0.25] * 3
    assert logprobs["text_offset"] == [0, 1, 2]
    assert logprobs["top_logprobs"][0] == {"H": -0.25, "a": -2.0}


def test_stop_string(client: TestClient) -> None:
    body = complete(client, prompt="Hi", max_tokens=30, stop=[","])
    choice = body["choices"][0]
    assert choice["text"] == "Hello world"
    assert choice["finish_reason"] == "stop"
    assert choice["stop_reason"] == ","


def test_stop_as_single_string_and_include_stop(client: TestClient) -> None:
    body = complete(client, prompt="Hi", max_tokens=30, stop=",", include_stop_str_in_output=True)
    assert body["choices"][0]["text"] == "Hello world,"


def test_sampling_fields_reach_the_engine(client: TestClient, engine: FakeEngine) -> None:
    complete(
        client,
        prompt="Hi",
        max_tokens=4,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        presence_penalty=0.5,
        frequency_penalty=-0.5,
        top_k=5,
        min_p=0.1,
        repetition_penalty=1.2,
        ignore_eos=True,
        min_tokens=2,
        skip_special_tokens=False,
        stop_token_ids=[9],
        best_of=1,
        user="someone",
        an_unknown_field={"ignored": True},
    )
    params = engine.submitted[-1][2]
    assert (params.temperature, params.top_p, params.seed) == (0.5, 0.9, 7)
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -0.5)
    assert (params.top_k, params.min_p, params.repetition_penalty) == (5, 0.1, 1.2)
    assert params.ignore_eos and params.min_tokens == 2 and not params.skip_special_tokens
    assert params.stop_token_ids == (9,)
    assert params.max_tokens == 4


def test_stream_framing_and_content(client: TestClient, engine: FakeEngine) -> None:
    engine.options.step_delay = 0.01  # slower than the client reads: one chunk per token
    response = client.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "stream": True}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.endswith("data: [DONE]\n\n")
    payloads = sse_payloads(response.text)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert len({c["id"] for c in chunks}) == 1
    assert "".join(c["choices"][0]["text"] for c in chunks) == DEFAULT_SCRIPT[:4]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, None, None, "length"]
    assert all("usage" not in c for c in chunks)


def test_stream_include_usage(client: TestClient) -> None:
    response = client.post(
        "/v1/completions",
        json={
            "prompt": ["a", "b"],
            "max_tokens": 2,
            "n": 2,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    final = chunks[-1]
    assert final["choices"] == []
    assert final["usage"] == {"prompt_tokens": 4, "completion_tokens": 8, "total_tokens": 12}
    texts: dict[int, str] = {}
    for chunk in chunks[:-1]:
        (choice,) = chunk["choices"]
        texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert texts == {0: "He", 1: "el", 2: "He", 3: "el"}


def test_stream_echo_and_logprobs(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "stream": True, "echo": True}
    )
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    assert chunks[0]["choices"][0]["text"] == "Hi"
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Hi" + DEFAULT_SCRIPT[:2]
    response = client.post(
        "/v1/completions", json={"prompt": "Hi", "max_tokens": 3, "stream": True, "logprobs": 1}
    )
    chunks = [json.loads(p) for p in sse_payloads(response.text)[:-1]]
    # A client slower than the engine gets several tokens per chunk; offsets still add up.
    offsets = [o for c in chunks for o in c["choices"][0]["logprobs"]["text_offset"]]
    assert offsets == [0, 1, 2]
    tokens = [t for c in chunks for t in c["choices"][0]["logprobs"]["tokens"]]
    assert "".join(tokens) == "".join(c["choices"][0]["text"] for c in chunks)


@pytest.mark.parametrize("prompt", ["Hi", [[40, 41], [42]]])
def test_echo_logprobs_streamed_equal_the_non_streamed_ones(client: TestClient, prompt) -> None:
    """The generated tokens' text_offset went on from the prompt's text length in a stream
    but from the prompt tokens' (the "<s>" included) without one, as vLLM's non-streamed
    answer counts them."""
    body = {"prompt": prompt, "max_tokens": 3, "echo": True, "logprobs": 1, "n": 2}
    whole = {c["index"]: c["logprobs"] for c in complete(client, **body)["choices"]}
    response = client.post("/v1/completions", json={**body, "stream": True})
    streamed: dict[int, dict] = {}
    for payload in sse_payloads(response.text)[:-1]:
        for choice in json.loads(payload)["choices"]:
            logprobs = streamed.setdefault(choice["index"], {})
            for key, values in choice["logprobs"].items():
                logprobs[key] = logprobs.get(key, []) + values
    assert streamed == whole


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"suffix": "x"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"logit_bias": {"9999": 10}}, "logit_bias"),
        ({"logit_bias": {"50": 101}}, "logit_bias"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"stop_token_ids": [2**40]}, "stop_token_ids"),
        ({"seed": 2**70}, "seed"),
        ({"top_k": 2**40}, "top_k"),
        ({"min_tokens": 2**40, "max_tokens": None}, "min_tokens"),
        ({"stop": [f"s{i}" for i in range(65)]}, "stop"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [1, 99999]}, "prompt"),
        ({"logprobs": 21}, "logprobs"),
        ({"n": 0}, "n"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"stop": ["ok", ""]}, "stop"),
        # A stream has no place for them (vLLM refuses them too); they were dropped silently.
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        # vLLM's fields this server does not implement: they were accepted and ignored.
        # vLLM's bad_words must be a list of words.
        ({"bad_words": "Hello"}, "bad_words"),
        ({"bad_words": [""]}, "bad_words"),
        ({"bad_words": ["  "]}, "bad_words"),
        ({"bad_words": [5]}, "bad_words"),
        ({"bad_words": ["w"] * 129}, "bad_words"),
        ({"bad_words": ["w" * 257]}, "bad_words"),
        # vLLM's refusals of allowed_token_ids: empty, outside the vocabulary; not ids.
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [75, 99999]}, "allowed_token_ids"),
        ({"allowed_token_ids": [-1]}, "allowed_token_ids"),
        ({"allowed_token_ids": [True]}, "allowed_token_ids"),
        ({"allowed_token_ids": "75"}, "allowed_token_ids"),
        ({"use_beam_search": True}, "use_beam_search"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncation_side": "right"}, "truncation_side"),
        ({"logits_processors": ["x"]}, "logits_processors"),
        ({"return_tokens_as_token_ids": "yes"}, "return_tokens_as_token_ids"),
    ],
)
def test_unsupported_or_invalid_fields_are_400(client: TestClient, body: dict, param: str) -> None:
    response = client.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_allowed_token_ids_reach_the_engine_sorted_once_each(
    client: TestClient, engine: FakeEngine
) -> None:
    complete(client, prompt="Hi", max_tokens=1, allowed_token_ids=[80, 75, 80])
    assert engine.submitted[-1][2].allowed_token_ids == (75, 80)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    response = client.post("/v1/chat/completions", json={**chat, "allowed_token_ids": [9]})
    assert response.status_code == 200, response.text
    assert engine.submitted[-1][2].allowed_token_ids == (9,)


def test_bad_words_reach_the_engine_as_token_sequences(
    client: TestClient, engine: FakeEngine
) -> None:
    # The fake tokenizer has one token per character, so " Hi" is not the same word as "Hi"
    # (one token more): only the spelling without the space is kept, as vLLM keeps it.
    tokenizer = engine.tokenizer
    complete(client, prompt="x", max_tokens=1, bad_words=["Hi", "  Hi", "K"])
    hi, k = tuple(tokenizer.encode("Hi", False)), tuple(tokenizer.encode("K", False))
    assert engine.submitted[-1][2].bad_words_token_ids == (hi, k)
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
    response = client.post("/v1/chat/completions", json={**chat, "bad_words": ["K"]})
    assert response.status_code == 200, response.text
    assert engine.submitted[-1][2].bad_words_token_ids == (k,)
