"""A real model through a pipeline of ``molink serve`` processes gives exactly what one
process gives: the same tokens, text and finish reasons, with 16 requests in flight at
once (prompts of different lengths, different max_tokens, streamed or not, greedy or
seeded), and afterwards no node holds a sequence.

Activations travel in the model dtype (``--molink-wire-dtype auto``), so nothing may differ.
"""

from __future__ import annotations

import gc
from collections.abc import Sequence

import pytest

from molink.engine.offline import LLM
from tests.integration.pipeline_fixtures import (
    PASSAGE,
    assert_same_completions,
    assert_traffic_counted,
    complete_all,
    mixed_cases,
    reference_completions,
    running_pipeline,
    wait_pipeline_idle,
)

pytestmark = pytest.mark.integration

NUM_REQUESTS = 16
TINY_MAX_TOKENS = (7, 40, 1, 23, 64, 12)
# Modest lengths: three SmolLM2 processes share two cores.
SMOLLM_MAX_TOKENS = (6, 16, 1, 11, 3, 9)
SMOLLM_SPLITS = (0, 7, 19, 30)


async def _check_pipeline(model: str | None, bounds: Sequence[int], max_tokens) -> None:
    tokenizer_llm = LLM(model=model)
    cases = mixed_cases(tokenizer_llm.tokenizer.encode(PASSAGE), NUM_REQUESTS, max_tokens)
    expected = reference_completions(tokenizer_llm, cases)
    del tokenizer_llm
    gc.collect()  # the pipeline's processes need the memory more than this one
    assert any(len(c.tokens) > 1 for c in expected)
    with running_pipeline(bounds, model) as pipeline:
        got = await complete_all(pipeline.base_url, cases)
        assert_same_completions(got, expected, cases)
        assert_traffic_counted(pipeline, sum(len(c.tokens) for c in expected))
        wait_pipeline_idle(pipeline)


@pytest.mark.parametrize(
    "bounds", [(0, 1, 4), (0, 1, 3, 4)], ids=["2-stages-1-3", "3-stages-1-2-1"]
)
async def test_tiny_qwen3_pipeline_matches_one_process(tiny_model_dir, bounds) -> None:
    await _check_pipeline(str(tiny_model_dir("qwen3")), bounds, TINY_MAX_TOKENS)


@pytest.mark.slow
async def test_smollm2_three_stages_match_one_process() -> None:
    """The default model split 0-7 / 7-19 / 19-30: three processes of one thread each."""
    await _check_pipeline(None, SMOLLM_SPLITS, SMOLLM_MAX_TOKENS)
