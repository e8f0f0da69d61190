"""vLLM's structured_outputs options beside the constraint: the ones llguidance can honour
shape the grammar; the others are a 400 naming them, never silently ignored."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from molink.api import create_app
from molink.api.errors import APIError
from molink.api.schemas import CompletionRequest
from molink.api.structured import structured_spec
from molink.sampling.structured import GrammarCompiler
from molink.tokenizer.tokenizer import Tokenizer
from tests.helpers.fake_engine import FakeEngine

TAG = {"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}
SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "object", "properties": {}}},
    "required": ["a"],
}


def spec_of(**structured: object):
    return structured_spec(CompletionRequest(prompt="x", structured_outputs=structured))


def guidance_of(**structured: object) -> dict:
    spec = spec_of(**structured)
    assert spec is not None and spec.kind == "json"
    return json.loads(spec.spec)


def test_disable_any_whitespace_chooses_the_whitespace() -> None:
    assert guidance_of(json=SCHEMA, disable_any_whitespace=False)["x-guidance"] == {
        "whitespace_flexible": True
    }
    compact = guidance_of(json=SCHEMA, disable_any_whitespace=True)["x-guidance"]
    assert compact == {"whitespace_flexible": False}
    assert "x-guidance" not in guidance_of(json=SCHEMA)  # the server's default: compact
    assert guidance_of(json_object=True, disable_any_whitespace=False)["x-guidance"] == {
        "whitespace_flexible": True
    }


def test_whitespace_pattern_reaches_the_grammar() -> None:
    got = guidance_of(json=SCHEMA, whitespace_pattern="[ ]?")["x-guidance"]
    assert got == {"whitespace_pattern": "[ ]?"}


def test_disable_additional_properties_closes_every_object() -> None:
    schema = guidance_of(json=SCHEMA, disable_additional_properties=True)
    assert schema["additionalProperties"] is False
    assert schema["properties"]["b"]["additionalProperties"] is False
    kept = {**SCHEMA, "additionalProperties": True}
    assert guidance_of(json=kept, disable_additional_properties=True)["additionalProperties"]


@pytest.mark.parametrize(
    ("options", "word"),
    [
        ({"structural_tag": '{"structures": []}'}, "structural_tag"),
        ({"structural_tag": {"structures": [], "triggers": ["<f"]}}, "structural_tag"),
        ({"structural_tag": "not json"}, "structural_tag"),
        ({"structural_tag": {"structures": [TAG], "triggers": ["<g"]}}, "structural_tag"),
        (
            {"structural_tag": {"structures": [{"begin": "<f>"}], "triggers": ["<f"]}},
            "structural_tag",
        ),
        ({"structural_tag": {"format": {"type": "triggered_tags"}}}, "structural_tag"),
        ({"whitespace_pattern": "[ ]?", "regex": "a+"}, "whitespace_pattern"),
        ({"disable_additional_properties": True, "choice": ["a"]}, "disable_additional"),
        ({"json": SCHEMA, "no_such_option": True}, "no_such_option"),
    ],
)
def test_options_that_cannot_be_honoured_are_400(options: dict, word: str) -> None:
    with pytest.raises(APIError, match=word) as info:
        spec_of(**options)
    assert info.value.param.startswith("structured_outputs")


@pytest.mark.parametrize(
    ("option", "value"), [("whitespace_pattern", 3), ("disable_any_whitespace", "yes")]
)
def test_a_wrong_type_is_400_naming_the_option(option: str, value: object) -> None:
    with TestClient(create_app(FakeEngine())) as client:
        response = client.post(
            "/v1/completions",
            json={"prompt": "x", "structured_outputs": {"json": SCHEMA, option: value}},
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == f"structured_outputs.{option}"


def test_neutral_options_are_accepted() -> None:
    assert spec_of(regex="a+", disable_any_whitespace=True, disable_fallback=True) is not None


def test_the_route_answers_400_naming_the_field() -> None:
    with TestClient(create_app(FakeEngine())) as client:
        response = client.post(
            "/v1/completions",
            json={
                "prompt": "x",
                "structured_outputs": {
                    "regex": "a",
                    "structural_tag": {"structures": [TAG], "triggers": ["<f"]},
                },
            },
        )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "structured_outputs"


def test_flexible_whitespace_allows_a_space_and_compact_does_not(smollm_dir) -> None:
    tokenizer = Tokenizer.from_dir(smollm_dir)
    compiler = GrammarCompiler(tokenizer.to_json(), tokenizer.vocab_size, tokenizer.eos_token_ids)
    space = tokenizer.encode("{ ", add_special_tokens=False)

    def takes_a_space(**options: object) -> bool:
        matcher = compiler.matcher(spec_of(json=SCHEMA, **options))
        try:
            for token in space:
                matcher.accept(token)
        except Exception:
            return False
        return True

    assert takes_a_space(disable_any_whitespace=False)
    assert not takes_a_space(disable_any_whitespace=True)
    assert not takes_a_space()


def test_guided_whitespace_pattern_shapes_guided_json() -> None:
    spec = structured_spec(
        CompletionRequest(prompt="x", guided_json=SCHEMA, guided_whitespace_pattern="[ ]?")
    )
    assert json.loads(spec.spec)["x-guidance"] == {"whitespace_pattern": "[ ]?"}
    for body in ({"guided_regex": "a+"}, {}):
        with pytest.raises(APIError, match="guided_whitespace_pattern"):
            structured_spec(CompletionRequest(prompt="x", guided_whitespace_pattern="[ ]?", **body))


def test_a_structural_tag_holds_the_tagged_part_to_its_schema(smollm_dir) -> None:
    tokenizer = Tokenizer.from_dir(smollm_dir)
    compiler = GrammarCompiler(tokenizer.to_json(), tokenizer.vocab_size, tokenizer.eos_token_ids)
    int_tag = {"begin": "<f>", "schema": {"type": "integer"}, "end": "</f>"}
    tag = {"structures": [int_tag], "triggers": ["<f"]}
    from_so = spec_of(structural_tag=json.dumps(tag))
    body = CompletionRequest(prompt="x", response_format={"type": "structural_tag", **tag})
    assert structured_spec(body) == from_so and from_so.kind == "grammar"

    def takes(text: str) -> bool:
        matcher = compiler.matcher(from_so)
        try:
            for token in tokenizer.encode(text, add_special_tokens=False):
                matcher.accept(token)
        except Exception:
            return False
        return True

    assert takes("free text, then <f>12</f> and more")
    assert not takes("free text, then <f>x")
