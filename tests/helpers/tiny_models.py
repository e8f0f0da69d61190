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

TINY_ARCHS = (
    "llama",
    "llama3",
    "llama_tied",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
    "granite",
    "starcoder2",
    "cohere",
    "glm4",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "gpt_oss",
    "deepseek_v2",
    "deepseek_v3",
)
WINDOW = 6  # sliding windows smaller than the test prompts

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


def _llama_family(arch: str, kwargs: dict[str, Any]) -> str:
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
    return "LlamaConfig"


def _dense(arch: str, kwargs: dict[str, Any]) -> str:
    """Config class of each dense family, with the features that set it apart switched on."""
    if arch == "mistral":
        kwargs.update(head_dim=16, sliding_window=None)
        return "MistralConfig"
    if arch == "qwen2":
        kwargs["rope_theta"] = 1000000.0
        return "Qwen2Config"
    if arch == "qwen3":
        kwargs.update(head_dim=32, rope_theta=1000000.0)  # head_dim apart from hidden / heads
        return "Qwen3Config"
    if arch == "gemma2":
        kwargs.update(
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=16,  # llama.cpp scales by head_dim (the GGUF test's case)
            attn_logit_softcapping=3.0,
            final_logit_softcapping=4.0,
        )
        return "Gemma2Config"
    if arch == "gemma3":
        kwargs.update(
            head_dim=16,
            sliding_window=WINDOW,
            query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention"] * 2,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
        )
        return "Gemma3TextConfig"
    if arch == "phi3":
        half = 4  # rotary dims / 2 with partial_rotary_factor 0.5 of head_dim 16
        kwargs.update(
            sliding_window=WINDOW,
            original_max_position_embeddings=64,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.5, 2.0, 3.0][:half],
                "long_factor": [2.0, 3.0, 4.0, 6.0][:half],
                "original_max_position_embeddings": 64,
            },
        )
        return "Phi3Config"
    return _dense_more(arch, kwargs)


def _dense_more(arch: str, kwargs: dict[str, Any]) -> str:
    if arch == "olmo2":
        return "Olmo2Config"
    if arch == "granite":
        kwargs.update(
            embedding_multiplier=2.0,
            attention_multiplier=0.3,
            residual_multiplier=0.5,
            logits_scaling=2.0,
        )
        return "GraniteConfig"
    if arch == "starcoder2":
        kwargs.pop("rms_norm_eps")
        kwargs.update(norm_epsilon=1e-5, use_bias=True, sliding_window=WINDOW)
        return "Starcoder2Config"
    if arch == "cohere":
        kwargs.pop("rms_norm_eps")
        kwargs.update(layer_norm_eps=1e-5, use_qk_norm=True, logit_scale=0.5)
        return "CohereConfig"
    if arch == "glm4":
        kwargs.update(head_dim=16, attention_bias=True, partial_rotary_factor=0.5)
        return "Glm4Config"
    return _moe(arch, kwargs)


def _moe(arch: str, kwargs: dict[str, Any]) -> str:
    """Four experts, two per token; one dense layer where the family allows it."""
    if arch == "mixtral":
        kwargs.update(num_local_experts=4, num_experts_per_tok=2, sliding_window=WINDOW)
        return "MixtralConfig"
    qwen_moe = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
    if arch == "qwen2_moe":
        kwargs.update(qwen_moe, shared_expert_intermediate_size=64, mlp_only_layers=[1])
        return "Qwen2MoeConfig"
    if arch == "qwen3_moe":
        kwargs.update(qwen_moe, head_dim=32, norm_topk_prob=True, mlp_only_layers=[2])
        return "Qwen3MoeConfig"
    if arch == "gpt_oss":
        kwargs.update(
            num_local_experts=4,
            num_experts_per_tok=2,
            intermediate_size=64,
            head_dim=16,
            sliding_window=WINDOW,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 4.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 64,
            },
        )
        return "GptOssConfig"
    return _deepseek(arch, kwargs)


def _deepseek(arch: str, kwargs: dict[str, Any]) -> str:
    """Latent attention (V2 without a q latent, V3 with one and YaRN), a dense first layer."""
    kwargs.update(
        n_routed_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        n_shared_experts=1,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=12,
        first_k_dense_replace=1,
        n_group=2,
        topk_group=1,
        num_key_value_heads=4,
    )
    if arch == "deepseek_v2":
        kwargs.update(
            q_lora_rank=None, topk_method="group_limited_greedy", routed_scaling_factor=1.5
        )
        return "DeepseekV2Config"
    if arch == "deepseek_v3":
        kwargs.update(
            q_lora_rank=24,
            routed_scaling_factor=2.5,
            norm_topk_prob=True,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
            },
        )
        return "DeepseekV3Config"
    raise ValueError(f"unknown tiny architecture {arch!r}; known: {', '.join(TINY_ARCHS)}")


def tiny_config_kwargs(arch: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """The transformers config class name and keyword arguments for a tiny ``arch``."""
    kwargs = dict(_COMMON)
    if arch in ("llama", "llama_tied", "llama3"):
        cls = _llama_family(arch, kwargs)
    else:
        cls = _dense(arch, kwargs)
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
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                param.copy_(1 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith(".bias") or name.endswith("_bias") or name.endswith("sinks"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator))
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.1 * torch.randn(buffer.shape, generator=generator))


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


def load_reference_model(path: Path, attn_implementation: str | None = None) -> torch.nn.Module:
    """transformers' own model for ``path``, in float32 eval mode (test reference only).

    ``attn_implementation``: transformers' choice when None; ``"eager"`` is its plain
    definition (its SDPA path drops Gemma 2's soft-capping, for one)."""
    from transformers import AutoModelForCausalLM

    options = {} if attn_implementation is None else {"attn_implementation": attn_implementation}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **options)
    return model.eval()
