"""Tensor parallelism inside a stage: two CPU processes over gloo give what one gives.

Every run uses one torch thread per process and at most three model processes. The
engine of this process is rank 0; ``molink.parallel.follower`` children are the others.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from molink.engine.offline import LLM
from molink.models.decoder import DecoderSlice
from molink.sampling_params import SamplingParams
from tests.integration.pipeline_fixtures import (
    PASSAGE,
    assert_same_completions,
    complete_all,
    mixed_cases,
    reference_completions,
    running_pipeline,
)

pytestmark = pytest.mark.integration

PROMPTS = (
    "The quick brown fox",
    "Hello world! MoLink serves one language model",
    "What is the capital of France? Paris",
    "0123456789",
)
GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True, logprobs=0)
LOGPROB_TOLERANCE = 1e-4


def rank0_slice(llm: LLM) -> DecoderSlice:
    (stage,) = llm.engine.executor.stages  # type: ignore[attr-defined]
    return stage.model


@contextmanager
def tensor_parallel_llm(model: str, size: int) -> Iterator[LLM]:
    llm = LLM(model=model, dtype="float32", tensor_parallel_size=size)
    leader = rank0_slice(llm).leader
    assert leader is not None
    try:
        yield llm
    finally:
        leader.close()
        processes = leader.processes  # type: ignore[attr-defined]
        assert all(p.poll() is not None for p in processes), "a follower outlived close()"


def greedy(llm: LLM) -> list[tuple[list[int], list[float]]]:
    outputs = llm.generate(list(PROMPTS), GREEDY)
    return [(list(o.outputs[0].token_ids), list(o.outputs[0].logprobs or ())) for o in outputs]


@pytest.mark.parametrize(
    ("arch", "overrides"),
    [
        ("llama", {}),
        ("qwen3_moe", {}),
        # One KV head for two ranks (replicated) and a vocabulary that does not split evenly.
        ("llama", {"num_key_value_heads": 1, "vocab_size": 385}),
        # q/k norms: per-head LayerNorm weights cut by heads (Cohere); an RMSNorm over all
        # heads added up across ranks, its one KV head on both (OLMo 2).
        ("cohere", {}),
        ("olmo2", {"num_key_value_heads": 1}),
        # Experts stored interleaved and transposed: cut after they are rebuilt; sinks.
        ("gpt_oss", {}),
    ],
    ids=["llama", "qwen3_moe", "llama-kv1-vocab385", "cohere", "olmo2-kv1", "gpt_oss"],
)
def test_two_ranks_equal_one(tiny_model_dir, arch: str, overrides: dict) -> None:
    model = str(tiny_model_dir(arch, **overrides))
    expected = greedy(LLM(model=model, dtype="float32"))
    gc.collect()
    with tensor_parallel_llm(model, 2) as llm:
        assert rank0_slice(llm).group.size == 2
        got = greedy(llm)
    for (tokens, logprobs), (ref_tokens, ref_logprobs) in zip(got, expected, strict=True):
        assert tokens == ref_tokens
        assert len(logprobs) == len(tokens)
        for a, b in zip(logprobs, ref_logprobs, strict=True):
            assert abs(a - b) <= LOGPROB_TOLERANCE


@pytest.mark.parametrize("split_stage", [0, 1], ids=["head-tp2", "last-stage-tp2"])
async def test_pipeline_with_a_two_rank_stage_equals_one_process(
    tiny_model_dir, split_stage: int
) -> None:
    """Two stages (layers [0, 2) and [2, 4)), one of them on two ranks: three model
    processes, and the same completions as one process. On the head, the ranks follow its
    scheduler's blocks and embed; on the last stage, its own blocks and the LM head."""
    model = str(tiny_model_dir("qwen3"))
    llm = LLM(model=model)
    max_tokens = (9, 1, 14, 5)
    cases = mixed_cases(llm.tokenizer.encode(PASSAGE), len(max_tokens), max_tokens)
    expected = reference_completions(llm, cases)
    del llm
    gc.collect()
    tp_args = {split_stage: ("-tp", "2")}
    with running_pipeline((0, 2, 4), model, stage_args=tp_args) as pipeline:
        got = await complete_all(pipeline.base_url, cases)
        log = pipeline.nodes[split_stage].log_text()
    assert "tensor-parallel rank 1 of 2" in log
    assert_same_completions(got, expected, cases)
