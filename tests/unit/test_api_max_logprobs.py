"""--max-logprobs as vLLM takes it: values above OpenAI's 20 and -1 (no cap of the flag's
own), bounded only by what one step can carry; prompt logprobs keep their own bound."""

from __future__ import annotations

import argparse
import shlex

import pytest
import torch
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.serve import chat_options
from molink.errors import InvalidParameterError
from molink.limits import LIMITS
from molink.sampling import Sampler, SequenceSamplingState
from molink.sampling_params import SamplingParams
from tests.helpers.fake_engine import FakeEngine

USER = [{"role": "user", "content": "Hi"}]


def make(command: str) -> EngineArgs:
    namespace = add_engine_args(argparse.ArgumentParser()).parse_args(shlex.split(command))
    return EngineArgs.from_namespace(namespace)


def client_for(command: str) -> TestClient:
    args = make(command)
    return TestClient(create_app(FakeEngine(), ApiConfig(chat=chat_options(args, None, {}))))


@pytest.mark.parametrize("value", ["100", "-1", str(LIMITS.max_logprobs)])
def test_vllm_values_of_the_flag_start(value: str) -> None:
    assert make(f"--max-logprobs {value}").max_logprobs == int(value)


@pytest.mark.parametrize("value", ["-2", str(LIMITS.max_logprobs + 1)])
def test_what_no_step_can_carry_is_refused_by_name(value: str) -> None:
    with pytest.raises(InvalidParameterError, match=str(LIMITS.max_logprobs)) as info:
        make(f"--max-logprobs {value}")
    assert info.value.field == "max_logprobs"


def test_a_hundred_alternatives_are_served_when_the_flag_allows_them() -> None:
    with client_for("--max-logprobs 100") as client:
        body = {"prompt": "Hi", "max_tokens": 2, "logprobs": 100}
        response = client.post("/v1/completions", json=body)
        assert response.status_code == 200, response.text
        chat = {"messages": USER, "max_tokens": 2, "logprobs": True, "top_logprobs": 50}
        response = client.post("/v1/chat/completions", json=chat)
        assert response.status_code == 200, response.text
        content = response.json()["choices"][0]["logprobs"]["content"]
        assert len(content[0]["top_logprobs"]) == 50
        over = client.post("/v1/completions", json={**body, "logprobs": 101})
        assert over.status_code == 400 and over.json()["error"]["param"] == "logprobs"


def test_minus_one_allows_up_to_the_servers_bound() -> None:
    with client_for("--max-logprobs -1") as client:
        body = {"prompt": "Hi", "max_tokens": 1, "logprobs": LIMITS.max_logprobs}
        assert client.post("/v1/completions", json=body).status_code == 200
        over = client.post("/v1/completions", json={**body, "logprobs": LIMITS.max_logprobs + 1})
        assert over.status_code == 400, over.text
        error = over.json()["error"]
        assert error["param"] == "logprobs" and str(LIMITS.max_logprobs) in error["message"]


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "Hi", "prompt_logprobs": 21}, "prompt_logprobs"),
        ("/v1/completions", {"prompt": "Hi", "echo": True, "logprobs": 21}, "logprobs"),
        ("/v1/chat/completions", {"messages": USER, "prompt_logprobs": 21}, "prompt_logprobs"),
    ],
)
def test_prompt_logprobs_keep_their_own_bound(path: str, body: dict, param: str) -> None:
    """The whole prompt's logprobs travel in one message: they stay at 20 alternatives, and
    the refusal says so (it named prompt_logprobs for an echo that never sent it)."""
    with client_for("--max-logprobs 100") as client:
        response = client.post(path, json={"max_tokens": 1, **body})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == param
        assert str(LIMITS.max_prompt_logprobs) in error["message"]


def test_the_sampler_returns_every_alternative_asked_for() -> None:
    logits = torch.randn(2, 300, generator=torch.Generator().manual_seed(3))
    states = [
        SequenceSamplingState(SamplingParams(temperature=0.0, logprobs=k), [0], 1) for k in (100, 0)
    ]
    (token, logprob, top), (_, _, none) = Sampler((3,), 300).sample(logits, states)
    expected = torch.log_softmax(logits[0], dim=-1).topk(100)
    assert [t.token_id for t in top] == expected.indices.tolist()
    assert token == expected.indices[0].item() and none == ()
    assert logprob == pytest.approx(expected.values[0].item(), abs=1e-6)


def test_the_engine_returns_a_hundred_alternatives_per_token(tiny_model_dir) -> None:
    from molink.engine.offline import LLM

    llm = LLM(model=str(tiny_model_dir("llama")), dtype="float32", block_size=16, num_kv_blocks=16)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True, logprobs=100)
    (output,) = llm.generate([[5, 6, 7, 8]], params)
    choice = output.outputs[0]
    assert len(choice.top_logprobs) == 3
    rows = zip(choice.token_ids, choice.logprobs, choice.top_logprobs, strict=True)
    for token, logprob, top in rows:
        values = [t.logprob for t in top]
        assert len(top) == 100 and values == sorted(values, reverse=True)
        assert top[0].token_id == token and top[0].logprob == pytest.approx(logprob)
