"""A prompt token's rank in prompt_logprobs is its real rank in the vocabulary, as vLLM
gives it, also when it is outside the top alternatives asked for."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

from molink.api import create_app
from molink.sampling.prompt_logprobs import prompt_token_logprobs
from molink.step import PromptTokenLogprob, SampledToken, StepResult, TokenLogprob
from molink.transport.convert import result_from_proto, result_to_proto
from tests.helpers.fake_engine import FakeEngine


def test_rank_counts_the_tokens_at_least_as_likely() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 1.0, 0.0, 5.0]])
    first, second = prompt_token_logprobs(logits, [2, 1], num_top=1)
    assert first.rank == 3 and [alt.token_id for alt in first.top] == [0]
    # A tie counts the tied token too, as vLLM's rank does (1 + those strictly above, or
    # the count of those at least as likely).
    assert second.rank == 3
    (top_one,) = prompt_token_logprobs(logits[:1], [0], num_top=0)
    assert top_one.rank == 1 and top_one.top == ()


def test_rank_crosses_the_wire() -> None:
    entry = PromptTokenLogprob(-2.0, (TokenLogprob(5, -0.1),), rank=9)
    result = StepResult(step_id=1, sampled=(SampledToken(3, 4, prompt_logprobs=(entry,)),))
    (token,) = result_from_proto(result_to_proto(result)).sampled
    assert token.prompt_logprobs == (entry,)


class _RankedEngine(FakeEngine):
    """Every prompt token after the first is the 7th most likely, outside the top 1."""

    async def _generate(self, request_id, prompt, params):
        async for output in super()._generate(request_id, prompt, params):
            if params.prompt_logprobs is not None:
                top = (TokenLogprob(0, -0.5),)
                output.prompt_logprobs = [
                    PromptTokenLogprob(-3.0, top, rank=7) for _ in output.prompt_token_ids[1:]
                ]
            yield output


def test_the_api_reports_the_real_rank() -> None:
    with TestClient(create_app(_RankedEngine())) as client:
        response = client.post(
            "/v1/completions", json={"prompt": "Hi", "max_tokens": 1, "prompt_logprobs": 1}
        )
    assert response.status_code == 200, response.text
    scored = response.json()["choices"][0]["prompt_logprobs"]
    for entry in scored[1:]:
        ranks = {token: item["rank"] for token, item in entry.items()}
        assert ranks.pop("0") == 1
        assert list(ranks.values()) == [7]
