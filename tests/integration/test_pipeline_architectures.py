"""Every architecture through a pipeline of two ``molink serve`` processes gives exactly
what one process gives (greedy and seeded requests of different lengths, in flight at once).

Lean on purpose: a tiny model per architecture, four requests, short completions. The full
mix of request kinds runs for Qwen3 in test_pipeline_model_fidelity.
"""

from __future__ import annotations

import gc

import pytest

from molink.engine.offline import LLM
from tests.helpers.tiny_models import TINY_ARCHS
from tests.integration.pipeline_fixtures import (
    PASSAGE,
    assert_same_completions,
    complete_all,
    mixed_cases,
    reference_completions,
    running_pipeline,
)

pytestmark = pytest.mark.integration

# Qwen3 runs in test_pipeline_model_fidelity; the llama variants differ only in rope/tying.
ARCHS = [a for a in TINY_ARCHS if a not in ("qwen3", "llama3", "llama_tied")]
MAX_TOKENS = (9, 1, 14, 5)


@pytest.mark.parametrize("arch", ARCHS)
async def test_two_processes_match_one(tiny_model_dir, arch: str) -> None:
    model = str(tiny_model_dir(arch))
    llm = LLM(model=model)
    cases = mixed_cases(llm.tokenizer.encode(PASSAGE), len(MAX_TOKENS), MAX_TOKENS)
    expected = reference_completions(llm, cases)
    del llm
    gc.collect()
    with running_pipeline((0, 2, 4), model) as pipeline:
        got = await complete_all(pipeline.base_url, cases)
    assert_same_completions(got, expected, cases)
