"""logit_bias keys: token ids written in canonical decimal, inside the vocabulary."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from molink.api import ApiConfig, create_app
from tests.helpers.fake_engine import FakeEngine

VOCAB = FakeEngine().tokenizer.vocab_size


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> Iterator[TestClient]:
    with TestClient(create_app(engine, ApiConfig())) as test_client:
        yield test_client


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_canonical_keys_reach_the_engine(client: TestClient, engine: FakeEngine, path) -> None:
    body = (
        {"prompt": "Hi"}
        if path == "/v1/completions"
        else {"messages": [{"role": "user", "content": "Hi"}]}
    )
    response = client.post(path, json={**body, "max_tokens": 1, "logit_bias": {"7": 5, "0": -1}})
    assert response.status_code == 200, response.text
    assert engine.submitted[-1][2].logit_bias == ((0, -1.0), (7, 5.0))


@pytest.mark.parametrize(
    "key",
    # "05" and "5" both named token 5 (two entries for one token); the others were read by
    # int() too: signs, spaces, underscores, non-ASCII digits; int() fails on 5000 digits.
    [
        "05",
        "+5",
        " 5",
        "5 ",
        "5_0",
        "\u0665",
        "-1",
        "1e2",
        "",
        "x",
        str(VOCAB),
        str(2**40),
        "9" * 5000,
    ],
)
def test_a_key_not_a_canonical_token_id_is_400(client: TestClient, key: str) -> None:
    response = client.post(
        "/v1/completions",
        json={"prompt": "Hi", "max_tokens": 1, "logit_bias": {"5": 1, key: 2}},
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "logit_bias"
    assert f"[0, {VOCAB - 1}]" in error["message"], error["message"]
