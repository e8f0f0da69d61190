"""Architecture-specific properties the logits comparison does not show on its own."""

from __future__ import annotations

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
