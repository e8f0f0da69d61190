"""Which Hugging Face architectures MoLink implements, and where each one lives.

Every architecture is one module under ``molink/models/archs`` exposing ``ARCHITECTURE``;
adding one is that file plus one line here. Names are resolved without importing the
modules (no torch), so parsing a config stays cheap.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from molink.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    from molink.config import ModelConfig
    from molink.models.architecture import DecoderArchitecture


@dataclass(frozen=True)
class Entry:
    module: str  # molink.models.archs.<module>
    gguf: str | None = None  # llama.cpp's general.architecture for this family
    # (Mistral's files are Llama's: the same computation under llama.cpp's "llama")


# What transformers' config class of a family assumes for a field its config.json leaves
# out, where MoLink's reading of a missing field would differ (files written by older
# transformers versions, or by hand, rely on these). Only fields MoLink reads are listed.
_GEMMA: dict[str, Any] = {
    "tie_word_embeddings": True,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
}
_QWEN: dict[str, Any] = {"use_sliding_window": False}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "MistralForCausalLM": {"sliding_window": 4096},
    "Qwen2ForCausalLM": _QWEN,
    "Qwen3ForCausalLM": _QWEN,
    "Gemma2ForCausalLM": {
        **_GEMMA,
        "final_logit_softcapping": 30.0,
        "attn_logit_softcapping": 50.0,
    },
    "Gemma3ForCausalLM": _GEMMA,
    "Phi3ForCausalLM": {"rms_norm_eps": 1e-5},
    "Olmo2ForCausalLM": {"rms_norm_eps": 1e-5},
    "Starcoder2ForCausalLM": {"tie_word_embeddings": True, "norm_epsilon": 1e-5},
    "CohereForCausalLM": {
        "tie_word_embeddings": True,
        "logit_scale": 0.0625,
        "layer_norm_eps": 1e-5,
    },
    "Glm4ForCausalLM": {
        "attention_bias": True,
        "head_dim": 128,
        "partial_rotary_factor": 0.5,
        "rms_norm_eps": 1.5625e-07,
    },
    "MixtralForCausalLM": {"rms_norm_eps": 1e-5},
    "Qwen2MoeForCausalLM": {**_QWEN, "shared_expert_intermediate_size": 5632},
    "Qwen3MoeForCausalLM": _QWEN,
    "GptOssForCausalLM": {
        "attention_bias": True,
        "head_dim": 64,
        "sliding_window": 128,
        "rms_norm_eps": 1e-5,
    },
    "DeepseekV2ForCausalLM": {"n_shared_experts": 2},
    "DeepseekV3ForCausalLM": {
        "n_shared_experts": 1,
        "routed_scaling_factor": 2.5,
        "n_group": 8,
        "topk_group": 4,
        "first_k_dense_replace": 3,
    },
}

# transformers' rope base and context length of each family, for a config.json that names
# neither. They are kept apart from _DEFAULTS because a base written inside rope_parameters
# or rope_scaling must still win over the family's value (config._rope_theta).
_ROPE_THETA: dict[str, float] = {
    "Gemma3ForCausalLM": 1_000_000.0,  # global layers; local ones read rope_local_base_freq
    "CohereForCausalLM": 500_000.0,
    "MixtralForCausalLM": 1_000_000.0,
    "GptOssForCausalLM": 150_000.0,
}
_MAX_POSITIONS: dict[str, int] = {
    "MistralForCausalLM": 131072,
    "Qwen2ForCausalLM": 32768,
    "Qwen3ForCausalLM": 32768,
    "Gemma2ForCausalLM": 8192,
    "Gemma3ForCausalLM": 131072,
    "Phi3ForCausalLM": 4096,
    "Starcoder2ForCausalLM": 4096,
    "CohereForCausalLM": 8192,
    "Glm4ForCausalLM": 131072,
    "MixtralForCausalLM": 131072,
    "Qwen2MoeForCausalLM": 32768,
    "Qwen3MoeForCausalLM": 32768,
    "GptOssForCausalLM": 131072,
    "DeepseekV3ForCausalLM": 4096,
}
# transformers' GPT-OSS applies YaRN even when a config names no rope scaling at all.
_ROPE_SCALING: dict[str, dict[str, Any]] = {
    "GptOssForCausalLM": {
        "rope_type": "yarn",
        "factor": 32.0,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "truncate": False,
        "original_max_position_embeddings": 4096,
    },
}
ROPE_THETA_DEFAULT = 10000.0  # transformers' default_theta for every other family
MAX_POSITIONS_DEFAULT = 2048  # LlamaConfig's, and Olmo2's, Granite's, DeepSeek-V2's

_REGISTRY: dict[str, Entry] = {
    "LlamaForCausalLM": Entry("llama", gguf="llama"),
    "MistralForCausalLM": Entry("mistral"),
    "Qwen2ForCausalLM": Entry("qwen2", gguf="qwen2"),
    "Qwen3ForCausalLM": Entry("qwen3", gguf="qwen3"),
    "Gemma2ForCausalLM": Entry("gemma2", gguf="gemma2"),
    "Gemma3ForCausalLM": Entry("gemma3", gguf="gemma3"),
    "Phi3ForCausalLM": Entry("phi3", gguf="phi3"),
    "Olmo2ForCausalLM": Entry("olmo2", gguf="olmo2"),
    "GraniteForCausalLM": Entry("granite", gguf="granite"),
    "Starcoder2ForCausalLM": Entry("starcoder2", gguf="starcoder2"),
    "CohereForCausalLM": Entry("cohere", gguf="command-r"),
    "Glm4ForCausalLM": Entry("glm4", gguf="glm4"),
    # llama.cpp writes Mixtral as "llama" and DeepSeek-V3 as "deepseek2": the Llama and
    # DeepSeek-V2 files tell them apart (gguf_variant).
    "MixtralForCausalLM": Entry("mixtral"),
    "Qwen2MoeForCausalLM": Entry("qwen2_moe", gguf="qwen2moe"),
    "Qwen3MoeForCausalLM": Entry("qwen3_moe", gguf="qwen3moe"),
    "GptOssForCausalLM": Entry("gpt_oss", gguf="gpt-oss"),
    "DeepseekV2ForCausalLM": Entry("deepseek_v2", gguf="deepseek2"),
    "DeepseekV3ForCausalLM": Entry("deepseek_v3"),
}

SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_REGISTRY)
GGUF_ARCHITECTURES: dict[str, str] = {
    entry.gguf: name for name, entry in _REGISTRY.items() if entry.gguf is not None
}


def resolve_architecture(archs: Sequence[str] | None) -> str:
    """Pick the first architecture in ``archs`` that MoLink implements.

    config.json lists ``architectures``; a checkpoint usually names exactly one.
    """
    for arch in archs or ():
        if arch in _REGISTRY:
            return arch
    raise UnsupportedArchitectureError(
        list(archs) if archs is not None else None, list(SUPPORTED_ARCHITECTURES)
    )


def config_defaults(architecture: str) -> dict[str, Any]:
    """transformers' values for the fields of ``architecture``'s config.json that a file may
    leave out (see _DEFAULTS); a field the file has, even null, wins."""
    return dict(_DEFAULTS.get(architecture, {}))


def rope_theta_default(architecture: str) -> float:
    """transformers' rope base for ``architecture`` when a config gives none anywhere."""
    return _ROPE_THETA.get(architecture, ROPE_THETA_DEFAULT)


def max_positions_default(architecture: str) -> int:
    """transformers' max_position_embeddings for ``architecture`` when a config omits it."""
    return _MAX_POSITIONS.get(architecture, MAX_POSITIONS_DEFAULT)


def rope_scaling_default(architecture: str) -> dict[str, Any] | None:
    """The scaling transformers applies when a config has neither rope_scaling nor
    rope_parameters (None: plain rope)."""
    scaling = _ROPE_SCALING.get(architecture)
    return dict(scaling) if scaling is not None else None


def architecture_for(config: ModelConfig) -> DecoderArchitecture:
    """The architecture object that builds and loads ``config``'s decoder."""
    return architecture_named(config.architecture)


def architecture_named(name: str) -> DecoderArchitecture:
    name = resolve_architecture([name])
    module = importlib.import_module(f"molink.models.archs.{_REGISTRY[name].module}")
    return module.ARCHITECTURE
