"""The default model (SmolLM2-135M-Instruct, from its GGUF) against transformers, greedily."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from molink.config import LayerRange
from molink.weights import default_model_gguf, resolve_model_source
from tests.helpers.greedy_reference import greedy_reference
from tests.helpers.paged_runner import PagedRunner, Seq

pytestmark = pytest.mark.slow

NEW_TOKENS = 24
CHATS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
]
PLAIN = ["The quick brown fox", "Once upon a time, in a small village,"]


@pytest.fixture(scope="module")
def tokenizer(smollm_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smollm_dir))


@pytest.fixture(scope="module")
def prompts(tokenizer) -> list[list[int]]:
    chats = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
        )
        for text in CHATS
    ]
    return [tokenizer(text, add_special_tokens=False).input_ids for text in chats + PLAIN]


@pytest.fixture(scope="module")
def reference_outputs(prompts: list[list[int]]) -> list[list[int]]:
    """transformers' greedy outputs on the GGUF, cached on disk (its loader takes a minute)."""
    return greedy_reference(default_model_gguf(), prompts, NEW_TOKENS)


def test_chat_template_is_in_tokenizer_config(smollm_dir: Path) -> None:
    config = json.loads((smollm_dir / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in config["chat_template"]
    assert (smollm_dir / "tokenizer.json").is_file()


def test_greedy_output_matches_transformers_gguf(
    smollm_dir: Path, prompts: list[list[int]], reference_outputs: list[list[int]]
) -> None:
    source = resolve_model_source(None)
    assert source.tokenizer_dir == smollm_dir
    config = source.model_config
    model = source.load_slice(LayerRange(0, config.num_layers), "float32")
    block_size, blocks_per_seq = 16, 8
    runner = PagedRunner([model], len(prompts) * blocks_per_seq, block_size)
    seqs = [
        Seq(list(p), list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)))
        for i, p in enumerate(prompts)
    ]
    runner.step([(s, len(s.tokens)) for s in seqs])
    runner.decode(seqs, NEW_TOKENS)
    compared = 0
    for seq, prompt, expected in zip(seqs, prompts, reference_outputs, strict=True):
        ours = seq.tokens[len(prompt) :]
        assert ours[: len(expected)] == expected
        compared += len(expected)
    # Short chat answers end at <|im_end|>; the plain prompts run the full length.
    assert compared >= 2 * NEW_TOKENS + len(CHATS) * 5
