"""Fields a config.json leaves out take the values transformers' config class gives them
(files written by older transformers versions omit fields whose default they relied on)."""

from __future__ import annotations

from typing import Any

import pytest
import transformers

from molink.config import ModelConfig
from molink.models.registry import _DEFAULTS, config_defaults
from tests.helpers.config_variants import edited_copy, max_logit_diff, without
from tests.helpers.tiny_models import WINDOW, tiny_config_kwargs

TOLERANCE = 1e-4
_TINY_OF = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",
    "Starcoder2ForCausalLM": "starcoder2",
    "CohereForCausalLM": "cohere",
    "Glm4ForCausalLM": "glm4",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "GptOssForCausalLM": "gpt_oss",
    "Phi3ForCausalLM": "phi3",
    "Olmo2ForCausalLM": "olmo2",
    "GraniteForCausalLM": "granite",
    "MixtralForCausalLM": "mixtral",
    "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3",
}


def _class_default(config: Any, key: str) -> Any:
    if key == "partial_rotary_factor":  # transformers 5 keeps it with the rotary settings
        return config.rope_parameters.get(key, getattr(config, key, None))
    return getattr(config, key)


@pytest.mark.parametrize("architecture", sorted(_DEFAULTS))
def test_each_default_is_the_transformers_config_class_default(architecture: str) -> None:
    cls_name, _ = tiny_config_kwargs(_TINY_OF[architecture])
    defaults = getattr(transformers, cls_name)()
    for key, value in config_defaults(architecture).items():
        assert _class_default(defaults, key) == value, f"{architecture}.{key}"


@pytest.mark.parametrize("architecture", sorted(_TINY_OF))
def test_a_config_without_norm_epsilon_has_the_class_default(architecture: str) -> None:
    cls_name, kwargs = tiny_config_kwargs(_TINY_OF[architecture])
    expected = getattr(transformers, cls_name)()
    eps_keys = ("rms_norm_eps", "layer_norm_eps", "norm_epsilon")
    eps = next(getattr(expected, key) for key in eps_keys if hasattr(expected, key))
    fields = {k: v for k, v in kwargs.items() if k not in eps_keys}
    config = ModelConfig.from_hf_dict({**fields, "architectures": [architecture]})
    assert config.rms_norm_eps == eps


def _drop_everywhere(*keys: str):
    drop_top = without(*keys)

    def drop(config: dict[str, Any]) -> None:
        drop_top(config)
        for key in keys:
            (config.get("rope_parameters") or {}).pop(key, None)

    return drop


_OLD_CONFIGS = [
    (
        "gemma2",
        dict(head_dim=256, query_pre_attn_scalar=256, final_logit_softcapping=30.0),
        (
            "tie_word_embeddings",
            "head_dim",
            "query_pre_attn_scalar",
            "final_logit_softcapping",
            "attn_logit_softcapping",
        ),
    ),
    ("gemma3", dict(query_pre_attn_scalar=256), ("tie_word_embeddings", "query_pre_attn_scalar")),
    ("cohere", dict(logit_scale=0.0625), ("tie_word_embeddings", "logit_scale")),
    ("starcoder2", {}, ("tie_word_embeddings",)),
    ("glm4", {}, ("attention_bias", "partial_rotary_factor")),
    ("gpt_oss", {}, ("attention_bias",)),
    ("qwen2_moe", dict(shared_expert_intermediate_size=5632), ("shared_expert_intermediate_size",)),
    ("deepseek_v2", dict(n_shared_experts=2), ("n_shared_experts",)),
    (
        "deepseek_v3",
        dict(n_routed_experts=16, n_group=8, topk_group=4, first_k_dense_replace=3),
        (
            "n_shared_experts",
            "routed_scaling_factor",
            "n_group",
            "topk_group",
            "first_k_dense_replace",
        ),
    ),
]


@pytest.mark.parametrize(("arch", "overrides", "dropped"), _OLD_CONFIGS)
def test_a_config_leaving_out_defaults_computes_as_transformers(
    tiny_model_dir, tmp_path, arch: str, overrides: dict, dropped: tuple[str, ...]
) -> None:
    path = edited_copy(
        tiny_model_dir(arch, **overrides), tmp_path / "m", _drop_everywhere(*dropped)
    )
    assert max_logit_diff(path, 2 * WINDOW, 2) <= TOLERANCE


def test_qwen_without_use_sliding_window_attends_fully(tiny_model_dir, tmp_path) -> None:
    """Qwen2.5's files say sliding_window 32768 with use_sliding_window false; without the
    flag transformers still attends fully."""

    def old(config: dict[str, Any]) -> None:
        config.pop("use_sliding_window", None)
        config.pop("layer_types", None)
        config["sliding_window"] = WINDOW
        config["max_window_layers"] = 0

    path = edited_copy(tiny_model_dir("qwen2"), tmp_path / "m", old)
    assert max_logit_diff(path, 3 * WINDOW, 2) <= TOLERANCE
