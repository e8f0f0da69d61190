"""Every architecture with a llama.cpp (GGUF) layout: files written as llama.cpp's converter
writes them, read back into our decoder, equal to transformers on the original checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from molink.config import LayerRange
from molink.models import SeqChunk
from molink.tokenizer.tokenizer import Tokenizer
from molink.weights import resolve_model_source
from tests.helpers.paged_runner import PagedRunner, load_pipeline
from tests.helpers.tiny_gguf import write_tiny_gguf
from tests.helpers.tiny_models import load_reference_model

TOLERANCE = 1e-4
# llama.cpp's converter writes no sliding window for the llama family or StarCoder 2, and
# no dense layers between Qwen-MoE's sparse ones: the tiny models follow what it can hold.
CASES: dict[str, dict] = {
    "mistral": {},
    "mixtral": {"sliding_window": None},
    "phi3": {},
    "olmo2": {},
    "granite": {},
    "starcoder2": {"sliding_window": None},
    "cohere": {},
    "glm4": {},
    "qwen2_moe": {"mlp_only_layers": []},
    "qwen3_moe": {"mlp_only_layers": []},
    "gpt_oss": {},
    "deepseek_v2": {},
    "deepseek_v3": {},
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "gpt_oss", "deepseek_v2", "deepseek_v3")


@pytest.fixture(scope="module")
def converted(tiny_model_dir, tmp_path_factory):
    built: dict[str, tuple[Path, Path]] = {}

    def make(arch: str) -> tuple[Path, Path]:
        if arch not in built:
            hf_dir = tiny_model_dir(arch, **CASES[arch])
            out = tmp_path_factory.mktemp("gguf") / f"tiny-{arch}.gguf"
            built[arch] = (hf_dir, write_tiny_gguf(hf_dir, out))
        return built[arch]

    return make


def _logits(slices, token_ids: list[int]) -> torch.Tensor:
    runner = PagedRunner(slices, 16, 4)
    hidden = runner.forward([SeqChunk(0, len(token_ids), list(range(8)))], token_ids)
    return slices[-1].compute_logits(hidden)


@pytest.mark.parametrize("arch", list(CASES))
def test_gguf_file_equals_transformers(converted, arch: str) -> None:
    hf_dir, path = converted(arch)
    source = resolve_model_source(str(path))
    original = resolve_model_source(str(hf_dir)).model_config
    # A Mistral file is a Llama file (same computation); the others keep their identity.
    expected_arch = "LlamaForCausalLM" if arch == "mistral" else original.architecture
    assert source.model_config.architecture == expected_arch
    tokens = list(range(5, 29))  # longer than the tiny models' sliding windows
    with torch.no_grad():
        expected = load_reference_model(hf_dir)(torch.tensor([tokens])).logits[0]
    for stages in (1, 2):
        ours = _logits(load_pipeline(source, stages), tokens)
        diff = (ours - expected).abs().max().item()
        assert diff <= TOLERANCE, f"{arch} in {stages} slices: max |diff| {diff}"


@pytest.mark.parametrize("arch", MOE)
def test_a_gguf_stage_reads_only_its_own_layers_and_experts(converted, arch: str) -> None:
    _, path = converted(arch)
    source = resolve_model_source(str(path))
    source.load_slice(LayerRange(2, 3), "float32")
    read = source.last_store.read_names
    assert {name.split(".")[2] for name in read} == {"2"}
    assert any(".experts" in name for name in read)


@pytest.mark.parametrize("arch", ["olmo2", "granite", "cohere", "glm4", "gpt_oss", "deepseek_v3"])
def test_gguf_tokenizer_of_families_transformers_cannot_configure(
    converted, arch: str, monkeypatch, tmp_path
) -> None:
    """transformers' AutoTokenizer refuses these files (or fails on them); ours reads the
    tokenizer metadata alone and tokenizes as the original checkpoint does."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("MOLINK_CACHE_DIR", str(tmp_path))
    hf_dir, path = converted(arch)
    ours = Tokenizer.from_dir(resolve_model_source(str(path)).tokenizer_dir)
    original = AutoTokenizer.from_pretrained(str(hf_dir))
    for text in ("Hello world! What is the capital of France?", "<|im_start|>user\n0123<|im_end|>"):
        assert ours.encode(text) == original(text).input_ids
    assert ours.eos_token == original.eos_token
    assert ours.chat_template == original.chat_template
