"""Gemma 3 270M (real weights) through two ``molink serve`` processes: greedy tokens equal
transformers' own generation on the same GGUF."""

from __future__ import annotations

from pathlib import Path

import pytest

from molink.api.logprobs import token_text
from molink.tokenizer import Tokenizer
from molink.weights.gguf_convert import cached_gguf_as_hf_dir
from tests.helpers.greedy_reference import greedy_reference
from tests.integration.pipeline_fixtures import Case, complete_all, running_pipeline
from tests.unit.test_models_gemma3 import NEW_TOKENS, PROMPTS

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def test_two_stages_match_transformers(gemma3_gguf: Path) -> None:
    model_dir = cached_gguf_as_hf_dir(gemma3_gguf)
    tokenizer = Tokenizer.from_dir(model_dir)
    prompts = [tokenizer.encode(text) for text in PROMPTS]
    expected = greedy_reference(gemma3_gguf, prompts, NEW_TOKENS)
    cases = [
        Case(prompt=p, max_tokens=NEW_TOKENS, stream=i % 2 == 1, ignore_eos=True)
        for i, p in enumerate(prompts)
    ]
    with running_pipeline((0, 9, 18), str(model_dir)) as pipeline:
        got = await complete_all(pipeline.base_url, cases)
    for completion, reference in zip(got, expected, strict=True):
        assert completion.tokens == tuple(token_text(tokenizer, t) for t in reference)
