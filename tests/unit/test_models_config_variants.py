"""Config settings real checkpoints use, each computed as transformers computes it."""

from __future__ import annotations

import pytest

from molink.config import LayerRange
from molink.errors import InvalidParameterError
from molink.weights import resolve_model_source
from tests.helpers.config_variants import max_logit_diff

TOLERANCE = 1e-4


def test_gemma3_does_not_softcap_attention_scores_as_transformers(tiny_model_dir) -> None:
    path = tiny_model_dir("gemma3", attn_logit_softcapping=3.0)
    assert max_logit_diff(path, 12, 2) <= TOLERANCE


@pytest.mark.parametrize(
    "arch", ["mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
)
def test_experts_use_the_configured_activation(tiny_model_dir, arch: str) -> None:
    path = tiny_model_dir(arch, hidden_act="gelu")
    assert max_logit_diff(path, 10, 2) <= TOLERANCE


def test_qwen2_moe_without_qkv_bias(tiny_model_dir) -> None:
    path = tiny_model_dir("qwen2_moe", qkv_bias=False)
    assert max_logit_diff(path, 10, 2) <= TOLERANCE


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gemma2", "cohere", "starcoder2"])
def test_partial_rotary_is_refused_where_the_family_rotates_whole_heads(
    tiny_model_dir, arch: str
) -> None:
    """transformers' code of these families ignores the factor with unscaled rotary and
    cannot run it with scaling; only Phi-3 and GLM-4 rotate part of a head."""
    path = tiny_model_dir(arch, partial_rotary_factor=0.5)
    with pytest.raises(InvalidParameterError, match="0.5 is not supported") as info:
        resolve_model_source(str(path)).load_slice(LayerRange(0, 1), "float32")
    assert info.value.field == "partial_rotary_factor"


@pytest.mark.parametrize("arch", ["deepseek_v2", "deepseek_v3"])
def test_deepseek_mlp_bias_as_transformers(tiny_model_dir, arch: str) -> None:
    """V2's dense MLPs and shared experts take mlp_bias; V3's code ignores the field."""
    path = tiny_model_dir(arch, mlp_bias=True)
    assert max_logit_diff(path, 10, 2) <= TOLERANCE


def test_gemma3_attending_both_ways_is_refused(tiny_model_dir) -> None:
    path = tiny_model_dir("gemma3", use_bidirectional_attention=True)
    with pytest.raises(InvalidParameterError, match="causal") as info:
        resolve_model_source(str(path)).load_slice(LayerRange(0, 1), "float32")
    assert info.value.field == "use_bidirectional_attention"
