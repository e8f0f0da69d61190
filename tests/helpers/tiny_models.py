"""Tiny random checkpoints in Hugging Face format, built with transformers' own classes.

``make_tiny_model(arch, path)`` writes config.json, model.safetensors, tokenizer.json and
tokenizer_config.json (with a chat template) into ``path``: a directory that every part of
MoLink can load end to end, in a fraction of a second.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

TINY_ARCHS = ("llama", "llama3", "llama_tied", "mistral", "qwen2", "qwen3")

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TOKENIZER_CORPUS = (
    "The quick brown fox jumps over the lazy dog. Hello world! "
    "MoLink serves one language model from machines joined by weak networks. "
    "What is the capital of France? Paris is the capital of France. 0123456789 "
)

_COMMON: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 384,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5,
    # Larger than the usual 0.02 so that logits differ clearly between tokens.
    "initializer_range": 0.1,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}


def tiny_config_kwargs(arch: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """The transformers config class name and keyword arguments for a tiny ``arch``."""
    kwargs = dict(_COMMON)
    if arch in ("llama", "llama_tied", "llama3"):
        cls = "LlamaConfig"
        kwargs["rope_theta"] = 10000.0
        if arch == "llama_tied":
            kwargs["tie_word_embeddings"] = True
        if arch == "llama3":
            kwargs["rope_theta"] = 500000.0
            kwargs["rope_scaling"] = {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
    elif arch == "mistral":
        cls = "MistralConfig"
        kwargs["head_dim"] = 16
        kwargs["sliding_window"] = None
    elif arch == "qwen2":
        cls = "Qwen2Config"
        kwargs["rope_theta"] = 1000000.0
    elif arch == "qwen3":
        cls = "Qwen3Config"
        kwargs["head_dim"] = 32  # Qwen3 decouples head_dim from hidden / heads
        kwargs["rope_theta"] = 1000000.0
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")
    kwargs.update(overrides)
    return cls, kwargs


def make_tiny_model(arch: str, path: Path, seed: int = 0, **overrides: Any) -> Path:
    """Build a tiny random ``arch`` model and save it (safetensors) plus a tokenizer."""
    import transformers

    cls_name, kwargs = tiny_config_kwargs(arch, **overrides)
    config = getattr(transformers, cls_name)(**kwargs)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_norms(model, seed)
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    make_tiny_tokenizer(path)
    return path


def _randomize_norms(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at 1 and biases at 0; random values test that we load them."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))


def make_tiny_tokenizer(path: Path, vocab_size: int = 320) -> Path:
    """A byte-level BPE tokenizer.json + tokenizer_config.json (with chat template)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([TOKENIZER_CORPUS] * 4, trainer=trainer)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(path / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "add_bos_token": False,
        "model_max_length": 256,
        "chat_template": CHAT_TEMPLATE,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path


def load_reference_model(path: Path) -> torch.nn.Module:
    """transformers' own model for ``path``, in float32 eval mode (test reference only)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()
