"""GGUF metadata for a tiny checkpoint, written as llama.cpp's converter writes it per family.

The shared part follows the converter's ``TextModel.set_gguf_parameters``; each family adds
(or, like Phi-3 and DeepSeek, replaces) what its converter class writes.
"""

from __future__ import annotations

import math
from typing import Any

import gguf

GGUF_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "MixtralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Phi3ForCausalLM": "phi3",
    "Olmo2ForCausalLM": "olmo2",
    "GraniteForCausalLM": "granite",
    "Starcoder2ForCausalLM": "starcoder2",
    "CohereForCausalLM": "command-r",
    "Glm4ForCausalLM": "glm4",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "GptOssForCausalLM": "gpt-oss",
    "DeepseekV2ForCausalLM": "deepseek2",
    "DeepseekV3ForCausalLM": "deepseek2",
}


def gguf_arch_for(config: dict) -> str:
    return GGUF_ARCH[config["architectures"][0]]


def _rope(config: dict) -> dict[str, Any]:
    return dict(config.get("rope_parameters") or config.get("rope_scaling") or {})


def _base(writer, config: dict) -> None:
    """TextModel.set_gguf_parameters: sizes, heads, rope, norms, experts."""
    writer.add_name("tiny")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config.get("num_key_value_heads") or config["num_attention_heads"])
    rope = _rope(config)
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key in ("beta_fast", "beta_slow"):
            if rope.get(key) is not None:
                getattr(writer, f"add_rope_scaling_yarn_{key}")(rope[key])
    theta = rope.get("rope_theta") or config.get("rope_theta")
    if theta is not None:
        writer.add_rope_freq_base(float(theta))
    if config.get("rms_norm_eps") is not None:
        writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    eps = config.get("layer_norm_eps") or config.get("norm_epsilon")
    if eps is not None:
        writer.add_layer_norm_eps(eps)
    if config.get("num_local_experts") is not None:
        writer.add_expert_count(config["num_local_experts"])
    if config.get("num_experts_per_tok") is not None:
        writer.add_expert_used_count(config["num_experts_per_tok"])
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])


def _llama(writer, config: dict) -> None:
    _base(writer, config)
    writer.add_vocab_size(config["vocab_size"])
    heads = config["num_attention_heads"]
    writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)


def _granite(writer, config: dict) -> None:
    _llama(writer, config)
    writer.add_attention_scale(config["attention_multiplier"])
    writer.add_embedding_scale(config["embedding_multiplier"])
    writer.add_residual_scale(config["residual_multiplier"])
    writer.add_logit_scale(config["logits_scaling"])


def _gemma2(writer, config: dict) -> None:
    _base(writer, config)
    writer.add_sliding_window(config["sliding_window"])
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])


def _phi3(writer, config: dict) -> None:
    """Phi3MiniModel writes its own set (no key_length; rotary dims from the partial factor)."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    rope = _rope(config)
    partial = rope.get("partial_rotary_factor") or config.get("partial_rotary_factor") or 1.0
    original = config.get("original_max_position_embeddings") or config["max_position_embeddings"]
    writer.add_name("tiny")
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_rope_scaling_orig_ctx_len(original)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(int(partial * hidden) // heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", 10000.0)))
    writer.add_sliding_window(config.get("sliding_window") or 0)
    if rope.get("rope_type") == "longrope":
        scale = config["max_position_embeddings"] / original
        factor = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        writer.add_rope_scaling_attn_factors(factor)


def _qwen_moe(writer, config: dict) -> None:
    _base(writer, config)
    if "num_local_experts" not in config:  # else written by _base already
        writer.add_expert_count(config["num_experts"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    if config.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])


def _command_r(writer, config: dict) -> None:
    _base(writer, config)
    writer.add_logit_scale(config["logit_scale"])
    writer.add_rope_scaling_type(gguf.RopeScalingType.NONE)


def _glm4(writer, config: dict) -> None:
    _base(writer, config)
    partial = _rope(config).get("partial_rotary_factor") or config.get("partial_rotary_factor", 0.5)
    writer.add_rope_dimension_count(int(config["head_dim"] * partial))


def _gpt_oss(writer, config: dict) -> None:
    _base(writer, config)
    writer.add_sliding_window(config["sliding_window"])
    writer.add_expert_feed_forward_length(config["intermediate_size"])


def _deepseek2(writer, config: dict) -> None:
    """DeepseekV2Model: latent attention as MQA over kv_lora_rank + rope, expert settings."""
    config = {**config, "num_key_value_heads": 1}
    config.pop("head_dim", None)  # not in DeepSeek's own config.json
    _base(writer, config)
    writer.add_leading_dense_block_count(config["first_k_dense_replace"])
    writer.add_vocab_size(config["vocab_size"])
    if config.get("q_lora_rank"):
        writer.add_q_lora_rank(config["q_lora_rank"])
    lora, rope_dim = config["kv_lora_rank"], config["qk_rope_head_dim"]
    writer.add_kv_lora_rank(lora)
    writer.add_key_length(lora + rope_dim)
    writer.add_value_length(lora)
    writer.add_key_length_mla(config["qk_nope_head_dim"] + rope_dim)
    writer.add_value_length_mla(config["v_head_dim"])
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_count(config["n_routed_experts"])
    writer.add_expert_shared_count(config.get("n_shared_experts", 0))
    writer.add_expert_weights_scale(config["routed_scaling_factor"])
    if config.get("norm_topk_prob"):
        writer.add_expert_weights_norm(True)
    writer.add_expert_group_count(config["n_group"])
    writer.add_expert_group_used_count(config["topk_group"])
    sigmoid = config["architectures"][0] == "DeepseekV3ForCausalLM"
    kind = gguf.ExpertGatingFuncType.SIGMOID if sigmoid else gguf.ExpertGatingFuncType.SOFTMAX
    writer.add_expert_gating_func(kind)
    writer.add_rope_dimension_count(rope_dim)
    mscale_all = _rope(config).get("mscale_all_dim")
    if mscale_all is not None:
        writer.add_rope_scaling_yarn_log_mul(0.1 * mscale_all)


_WRITERS = {
    "llama": _llama,
    "granite": _granite,
    "gemma2": _gemma2,
    "phi3": _phi3,
    "qwen2moe": _qwen_moe,
    "qwen3moe": _qwen_moe,
    "command-r": _command_r,
    "glm4": _glm4,
    "gpt-oss": _gpt_oss,
    "deepseek2": _deepseek2,
}


def write_metadata(writer, arch: str, config: dict) -> None:
    _WRITERS.get(arch, _base)(writer, config)
    if arch not in ("llama", "granite", "deepseek2"):
        writer.add_vocab_size(config["vocab_size"])
    heads = config["num_attention_heads"]
    if arch in ("qwen2", "qwen3", "gemma2", "olmo2", "starcoder2", "qwen2moe", "qwen3moe"):
        writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)
