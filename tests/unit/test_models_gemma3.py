"""Gemma 3 270M (real weights, Q4_K_M GGUF dequantized) against transformers, greedily."""

from __future__ import annotations

from pathlib import Path

import pytest

from molink.config import LayerRange
from molink.tokenizer import Tokenizer
from molink.weights import resolve_model_source
from molink.weights.gguf_convert import cached_gguf_source
from tests.helpers.greedy_reference import greedy_reference
from tests.helpers.paged_runner import PagedRunner, Seq, load_pipeline

pytestmark = pytest.mark.slow

NEW_TOKENS = 16
PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def source(gemma3_gguf: Path):
    """Converted once into a float32 safetensors directory in MoLink's cache (through the
    GGUF reader), as the default model is: later loads skip dequantizing."""
    return cached_gguf_source(gemma3_gguf, name="gemma-3-270m")


@pytest.fixture(scope="module")
def prompts(source) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    return [tokenizer(text).input_ids for text in PROMPTS]


def test_gguf_config_is_gemma3(source) -> None:
    config = source.model_config
    assert config.architecture == "Gemma3ForCausalLM"
    assert config.num_layers == 18 and config.num_kv_heads == 1 and config.head_dim == 256
    assert config.raw["layer_types"][5] == "full_attention"
    assert config.raw["layer_types"][4] == "sliding_attention"


def test_greedy_output_matches_transformers(source, gemma3_gguf: Path, prompts) -> None:
    expected = greedy_reference(gemma3_gguf, prompts, NEW_TOKENS)
    for num_stages in (1, 2):
        slices = load_pipeline(source, num_stages)
        runner = PagedRunner(slices, num_blocks=len(prompts) * 4, block_size=16)
        seqs = [Seq(list(p), list(range(i * 4, i * 4 + 4))) for i, p in enumerate(prompts)]
        runner.step([(s, len(s.tokens)) for s in seqs])
        runner.decode(seqs, NEW_TOKENS)
        for seq, prompt, reference in zip(seqs, prompts, expected, strict=True):
            assert seq.tokens[len(prompt) :] == reference, f"{num_stages} stage(s)"
    assert sum(len(r) for r in expected) == NEW_TOKENS * len(PROMPTS)


def test_a_stage_reads_only_its_layers(gemma3_gguf: Path) -> None:
    source = resolve_model_source(str(gemma3_gguf))  # straight from the GGUF file
    # Dequantized: a quantized slice may come from the packed cache without reading the file.
    source.load_slice(LayerRange(9, 18), "float32", quantization="none")
    read = source.last_store.read_names
    layers = {int(n.split(".")[2]) for n in read if n.startswith("model.layers.")}
    assert layers == set(range(9, 18))
    assert "model.embed_tokens.weight" in read  # tied: the last stage's LM head


def test_tokenizer_matches_transformers(source) -> None:
    """The tokenizer converted from the GGUF encodes and decodes as transformers' does."""
    from transformers import AutoTokenizer

    from tests.unit.test_tokenizer import compare_with_transformers

    compare_with_transformers(source.tokenizer_dir, AutoTokenizer)


def test_gemma_chat_format_for_a_file_without_a_template(source) -> None:
    """The GGUF ships no chat template: Gemma's format comes from its architecture file,
    renders through MoLink's tokenizer path as transformers renders it, and a turn's end
    stops generation."""
    from transformers import AutoTokenizer

    ours = Tokenizer.from_dir(source.tokenizer_dir)
    theirs = AutoTokenizer.from_pretrained(str(source.tokenizer_dir))
    chats = [
        [{"role": "user", "content": "Capital of France?"}],
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]},
            {"role": "assistant", "content": "Paris"},
            {"role": "user", "content": "And of Italy?"},
        ],
    ]
    for chat in chats:
        for add_generation_prompt in (True, False):
            rendered = ours.apply_chat_template(chat, add_generation_prompt=add_generation_prompt)
            expected = theirs.apply_chat_template(
                chat, tokenize=False, add_generation_prompt=add_generation_prompt
            )
            assert rendered == expected
    assert rendered.startswith("<bos><start_of_turn>user\nAnswer in one word.\n\nCapital")
    assert "<start_of_turn>model\nParis<end_of_turn>\n" in rendered
    assert ours.token_to_id("<end_of_turn>") in source.model_config.eos_token_ids
