"""Structured output and allowed_token_ids through a 2-stage pipeline: the grammar (or the
allowed ids) travels with the sequence to the last stage, which masks the logits there."""

from __future__ import annotations

import re

import httpx
import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.pipeline_fixtures import running_pipeline, served_model_name

pytestmark = pytest.mark.integration


class Pet(BaseModel):
    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=30)


def test_structured_output_through_two_stages() -> None:
    with running_pipeline((0, 15, 30)) as pipeline:
        model = served_model_name(pipeline.base_url)
        client = openai.OpenAI(base_url=f"{pipeline.base_url}/v1", api_key="x", max_retries=0)
        completion = client.chat.completions.parse(
            model=model,
            messages=[{"role": "user", "content": "A pet as JSON."}],
            response_format=Pet, temperature=1.0, n=4, max_tokens=60, seed=15,
        )  # fmt: skip
        assert all(isinstance(c.message.parsed, Pet) for c in completion.choices)
        pattern = r"(red|green|blue)-[0-9]{3}"
        text = client.completions.create(
            model=model, prompt="A code:", max_tokens=10, temperature=1.0,
            extra_body={"structured_outputs": {"regex": pattern}},
        ).choices[0].text  # fmt: skip
        assert re.fullmatch(pattern, text), text
        client.close()
        allowed = {100, 200, 300}
        body = {
            "model": model, "prompt": "A code:", "max_tokens": 8, "temperature": 1.0,
            "ignore_eos": True, "allowed_token_ids": sorted(allowed), "return_token_ids": True,
        }  # fmt: skip
        answer = httpx.post(f"{pipeline.base_url}/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        tokens = answer.json()["choices"][0]["token_ids"]
        assert len(tokens) == 8 and set(tokens) <= allowed, tokens
