"""Architecture-specific properties the logits comparison does not show on its own."""

from __future__ import annotations

import pytest
import torch

from molink.config import LayerRange, ModelConfig
from molink.models import KVCache, build_model
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.moe import MoE, MoESpec
from molink.weights import resolve_model_source


def test_latent_attention_caches_one_compressed_vector_per_token(tiny_model_dir) -> None:
    config = resolve_model_source(str(tiny_model_dir("deepseek_v3"))).model_config
    cache = KVCache.allocate(config, 2, num_blocks=3, block_size=4, dtype=torch.float32)
    latent, rope = config.raw["kv_lora_rank"], config.raw["qk_rope_head_dim"]
    assert cache.keys[0].shape == (3, 4, 1, latent + rope)
    assert cache.values[0].shape[-1] == 0  # values are the latent part of the keys
    full = config.num_heads * (config.raw["qk_nope_head_dim"] + rope + config.raw["v_head_dim"])
    assert KVCache.bytes_per_block(config, 2, 4, torch.float32) == 2 * 4 * (latent + rope) * 4
    assert latent + rope < full / 4


def _naive_moe(moe: MoE, h: torch.Tensor) -> torch.Tensor:
    """One token at a time, one expert at a time: the definition, slowly."""
    ids, weights = moe.route(h)
    inter = moe.spec.intermediate_size
    out = torch.zeros_like(h)
    for t in range(h.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            gate_up = h[t] @ moe.gate_up.weight[e].T
            act = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += weights[t, k] * (act @ moe.down.weight[e].T)
    return out


def test_experts_grouped_by_expert_equal_the_per_token_definition() -> None:
    torch.manual_seed(0)
    spec = MoESpec(hidden_size=16, intermediate_size=8, num_experts=6, top_k=2)
    moe = MoE(spec, LinearFactory(torch.float32, torch.device("cpu")))
    for param in moe.parameters():
        param.copy_(torch.randn_like(param))
    h = torch.randn(37, 16)
    assert torch.allclose(moe(h), _naive_moe(moe, h), atol=1e-4)


def test_a_stage_reads_only_its_own_experts(tiny_model_dir) -> None:
    source = resolve_model_source(str(tiny_model_dir("qwen2_moe")))
    source.load_slice(LayerRange(2, 3), "float32")
    read = source.last_store.read_names
    assert any(".mlp.experts.3." in name for name in read)
    assert {name.split(".")[2] for name in read} == {"2"}


def test_rope_variants_are_refused_or_built_per_config() -> None:
    base = dict(
        architecture="LlamaForCausalLM",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        head_dim=8,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=64,
    )
    dynamic = ModelConfig(**base, rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    plain = ModelConfig(**base)
    a = build_model(dynamic, LayerRange(0, 1), torch.float32).rotaries["default"]
    b = build_model(plain, LayerRange(0, 1), torch.float32).rotaries["default"]
    # Inside max_position_embeddings dynamic NTK does not rescale (as in transformers).
    assert torch.equal(a.cos, b.cos)
    from molink.errors import InvalidParameterError

    incomplete = [
        ({"rope_type": "linear"}, "linear scaling needs factor"),
        ({"type": "dynamic"}, "dynamic scaling needs factor"),
        ({"rope_type": "llama3", "factor": 8.0}, "needs low_freq_factor, high_freq_factor"),
        ({"rope_type": "longrope", "short_factor": [1.0] * 4}, "needs long_factor"),
        (
            {"rope_type": "longrope", "short_factor": [1.0] * 3, "long_factor": [2.0] * 4},
            "short_factor has 3 values; a rotated head of 8 needs 4",
        ),
    ]
    for scaling, message in incomplete:
        config = ModelConfig(**base, rope_scaling=scaling)
        with pytest.raises(InvalidParameterError, match=message) as info:
            build_model(config, LayerRange(0, 1), torch.float32)
        assert info.value.field == "rope_scaling"


def _with_config(tmp_path, source_dir, **changes) -> str:
    import json
    import shutil

    copy = tmp_path / "m"
    shutil.copytree(source_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    config.update(changes)
    (copy / "config.json").write_text(json.dumps(config))
    return str(copy)


def test_config_fields_we_cannot_run_are_refused_at_load_by_name(tiny_model_dir, tmp_path) -> None:
    from molink.errors import InvalidParameterError

    rope = {"rope_type": "mrope", "rope_theta": 10000.0, "mrope_section": [2, 2]}
    path = _with_config(tmp_path, tiny_model_dir("llama"), rope_parameters=rope)
    with pytest.raises(InvalidParameterError, match="rope type 'mrope'.*longrope") as info:
        resolve_model_source(path).load_slice(LayerRange(0, 1), "float32")
    assert info.value.field == "rope_scaling"
    path = _with_config(tmp_path / "b", tiny_model_dir("deepseek_v2"), topk_method="noaux_tc")
    with pytest.raises(InvalidParameterError, match="group_limited_greedy") as info:
        resolve_model_source(path).load_slice(LayerRange(0, 1), "float32")
    assert info.value.field == "topk_method"
    quant = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    path = _with_config(tmp_path / "c", tiny_model_dir("qwen3"), quantization_config=quant)
    with pytest.raises(InvalidParameterError, match="bitsandbytes") as info:
        resolve_model_source(path).load_slice(LayerRange(0, 1), "float32")
    assert info.value.field in ("quantization", "quantization_config")


def test_an_architecture_we_do_not_serve_is_named_with_the_supported_ones(
    tiny_model_dir, tmp_path
) -> None:
    from molink.errors import UnsupportedArchitectureError
    from molink.models.registry import SUPPORTED_ARCHITECTURES

    path = _with_config(tmp_path, tiny_model_dir("llama"), architectures=["MambaForCausalLM"])
    with pytest.raises(UnsupportedArchitectureError) as info:
        resolve_model_source(path)
    message = str(info.value)
    assert "MambaForCausalLM" in message
    assert len(SUPPORTED_ARCHITECTURES) >= 18
    assert all(name in message for name in SUPPORTED_ARCHITECTURES)


def test_phi3_su_scaling_is_longrope() -> None:
    from molink.models.rope import RopeSpec, RotaryTables

    factors = {"short_factor": [1.0, 1.5, 2.0, 3.0], "long_factor": [2.0, 3.0, 4.0, 6.0]}
    tables = [
        RotaryTables(
            RopeSpec(10000.0, 8, 128, scaling={key: kind, **factors}, original_max_positions=32),
            torch.float32,
            torch.device("cpu"),
        )
        for key, kind in (("type", "su"), ("rope_type", "longrope"))
    ]
    assert torch.equal(tables[0].cos, tables[1].cos)
    positions, lengths = torch.arange(40), torch.full((40,), 40)
    assert torch.equal(
        tables[0].lookup(positions, lengths)[0], tables[1].lookup(positions, lengths)[0]
    )


def test_phi3_yarn_named_scaling_is_longrope(tiny_model_dir) -> None:
    from dataclasses import replace

    from molink.models.registry import architecture_named

    config = resolve_model_source(str(tiny_model_dir("phi3"))).model_config
    assert config.rope_scaling is not None
    yarn_named = replace(config, rope_scaling={**config.rope_scaling, "rope_type": "yarn"})
    phi3 = architecture_named("Phi3ForCausalLM")
    a, b = phi3.rope_specs(config)["default"], phi3.rope_specs(yarn_named)["default"]
    assert a.scaling == b.scaling and a.scaling["rope_type"] == "longrope"


def test_a_parameter_no_binding_fills_is_refused_at_load() -> None:
    """A bias the architecture builds but binds no tensor to would keep its allocation."""
    from molink.errors import WeightLoadError
    from molink.models.architecture import gated_mlp_bindings
    from molink.models.blocks.mlp import GatedMLP
    from molink.models.loading import bind

    layer = torch.nn.Module()
    layer.mlp = GatedMLP(
        8, 16, torch.nn.functional.silu, LinearFactory(torch.float32, torch.device("cpu")), True
    )
    tensors = {
        "mlp.gate_proj.weight": torch.randn(16, 8),
        "mlp.up_proj.weight": torch.randn(16, 8),
        "mlp.down_proj.weight": torch.randn(8, 16),
    }
    with pytest.raises(WeightLoadError, match="mlp.gate_up.bias"):
        bind(layer, gated_mlp_bindings(""), tensors, pack=False)


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"top_k": 7}, "num_experts_per_tok"),
        ({"num_groups": 4}, "n_group"),
        ({"num_groups": 2, "topk_groups": 3}, "topk_group"),
        ({"routing": "sigmoid_group", "num_groups": 6}, "n_group"),
        (
            {"routing": "softmax_group", "num_groups": 3, "topk_groups": 1, "top_k": 3},
            "num_experts_per_tok",
        ),
    ],
)
def test_an_expert_choice_no_token_can_make_is_refused_by_field(changes: dict, field: str) -> None:
    from molink.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError) as info:
        MoESpec(
            **{"hidden_size": 16, "intermediate_size": 8, "num_experts": 6, "top_k": 2, **changes}
        )
    assert info.value.field == field


def test_key_value_heads_that_do_not_divide_the_heads_are_refused() -> None:
    from molink.errors import InvalidParameterError

    config = ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_layers=1,
        num_heads=4,
        num_kv_heads=3,
        head_dim=4,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=64,
    )
    with pytest.raises(InvalidParameterError) as info:
        build_model(config, LayerRange(0, 1), torch.float32)
    assert info.value.field == "num_key_value_heads"
