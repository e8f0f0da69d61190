"""DeepSeek-V2: multi-head latent attention with a compressed KV cache, and a mixture of
experts with shared experts, softmax routing (greedy or group-limited) and a routed scale."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch
from torch import nn

from molink.config import ModelConfig
from molink.errors import InvalidParameterError
from molink.models.architecture import (
    Binding,
    GGUFJoin,
    KVLayout,
    expert_bindings,
    gated_mlp_bindings,
    norm_binding,
    raw_rope_parameters,
)
from molink.models.archs.llama import Llama
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.mla import LatentAttention, MLASpec
from molink.models.blocks.moe import MoE, MoESpec
from molink.models.blocks.norms import RMSNorm
from molink.models.blocks.prenorm import PreNormLayer
from molink.models.rope import RopeSpec, rope_type_of, standard_scaling, yarn_mscale


def _kv_b_part(parts: list[torch.Tensor], heads: int, start: int, stop: int) -> torch.Tensor:
    (weight,) = parts  # [heads * (nope + v), lora]
    return weight.view(heads, -1, weight.shape[-1])[:, start:stop]


def _gguf_kv_b(parts: list[np.ndarray]) -> np.ndarray:
    """llama.cpp's k_b [H, lora, nope] (transposed) and v_b [H, v, lora] -> kv_b_proj."""
    k_b, v_b = parts
    joined = np.concatenate((k_b.transpose(0, 2, 1), v_b), axis=1)
    return joined.reshape(-1, joined.shape[-1])


def _same(parts: list[np.ndarray]) -> np.ndarray:
    (tensor,) = parts
    return tensor


_SIGMOID_GATING = 2  # llama.cpp's expert_gating_func: 1 softmax (V2), 2 sigmoid (V3)


def gguf_deepseek_fields(cfg: dict[str, Any], field: Any) -> dict[str, Any]:
    """Latent attention and experts from a ``deepseek2`` file (V2 and V3 alike)."""
    rope = int(field("rope.dimension_count"))
    # Files of latent attention as MQA say key/value_length_mla; older ones key/value_length.
    key = field("attention.key_length_mla") or field("attention.key_length")
    value = field("attention.value_length_mla") or field("attention.value_length")
    q_lora = field("attention.q_lora_rank")
    groups = int(field("expert_group_count") or 1)
    cfg = {
        **cfg,
        "num_key_value_heads": cfg["num_attention_heads"],  # the file says 1 (MQA form)
        "head_dim": rope,
        "q_lora_rank": int(q_lora) if q_lora else None,
        "kv_lora_rank": int(field("attention.kv_lora_rank")),
        "qk_rope_head_dim": rope,
        "qk_nope_head_dim": int(key) - rope,
        "v_head_dim": int(value),
        "first_k_dense_replace": int(field("leading_dense_block_count") or 0),
        "n_routed_experts": int(field("expert_count") or 0),
        "num_experts_per_tok": int(field("expert_used_count") or 0),
        "moe_intermediate_size": int(field("expert_feed_forward_length") or 0),
        "n_shared_experts": int(field("expert_shared_count") or 0),
        "routed_scaling_factor": float(field("expert_weights_scale") or 1.0),
        "norm_topk_prob": bool(field("expert_weights_norm", False)),
        "n_group": groups,
        "topk_group": int(field("expert_group_used_count") or 1),
        "topk_method": "group_limited_greedy" if groups > 1 else "greedy",
    }
    scaling = cfg.get("rope_scaling")
    log_multiplier = field("rope.scaling.yarn_log_multiplier")
    if scaling and scaling.get("rope_type") == "yarn" and log_multiplier:
        # llama.cpp keeps 0.1 * mscale_all_dim and assumes mscale equal to it.
        mscale = round(float(log_multiplier) / 0.1, 6)
        cfg["rope_scaling"] = {**scaling, "mscale": mscale, "mscale_all_dim": mscale}
    return cfg


class DeepseekV2(Llama):
    model_type = "deepseek_v2"
    interleaved_rope = True  # V2 rotates adjacent pairs (complex multiplication)
    gguf_permuted_qk = False  # as llama.cpp rotates them
    # V2's expert choice (config topk_method); V3 has one of its own whatever it says.
    routing_methods: tuple[str, ...] = ("greedy", "group_limited_greedy")

    def check_config(self, config: ModelConfig) -> None:
        super().check_config(config)
        method = config.raw.get("topk_method") or "greedy"
        if self.routing_methods and method not in self.routing_methods:
            raise InvalidParameterError(
                "topk_method",
                f"{method!r} is not supported; supported: {', '.join(self.routing_methods)}",
            )

    def gguf_variant(self, field: Any) -> str | None:
        if int(field("expert_gating_func") or 0) == _SIGMOID_GATING:
            return "DeepseekV3ForCausalLM"
        return None

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        return gguf_deepseek_fields(cfg, field)

    def gguf_join(self, name: str, config: ModelConfig) -> GGUFJoin | None:
        if name.endswith("self_attn.kv_b_proj.weight"):
            base = name[: -len("kv_b_proj.weight")]
            return GGUFJoin((base + "k_b_proj.weight", base + "v_b_proj.weight"), _gguf_kv_b)
        if name.endswith("mlp.gate.e_score_correction_bias"):
            return GGUFJoin((name.replace("_bias", ".bias"),), _same)
        return None

    def mla_spec(self, config: ModelConfig) -> MLASpec:
        raw = config.raw
        nope, rope = int(raw["qk_nope_head_dim"]), int(raw["qk_rope_head_dim"])
        scale = (nope + rope) ** -0.5
        scaling = config.rope_scaling
        if rope_type_of(scaling) != "default" and scaling and scaling.get("mscale_all_dim"):
            mscale = yarn_mscale(float(scaling["factor"]), float(scaling["mscale_all_dim"]))
            scale = scale * mscale * mscale
        q_lora = raw.get("q_lora_rank")
        return MLASpec(
            hidden_size=config.hidden_size,
            num_heads=config.num_heads,
            q_lora_rank=int(q_lora) if q_lora else None,
            kv_lora_rank=int(raw["kv_lora_rank"]),
            qk_nope_head_dim=nope,
            qk_rope_head_dim=rope,
            v_head_dim=int(raw["v_head_dim"]),
            norm_eps=config.rms_norm_eps,
            scale=scale,
            bias=config.attention_bias,
        )

    def tensor_parallel_refusal(self, config: ModelConfig) -> str | None:
        return "multi-head latent attention is not split across tensor-parallel ranks"

    def kv_layout(self, config: ModelConfig) -> KVLayout:
        spec = self.mla_spec(config)
        return KVLayout(1, spec.kv_lora_rank + spec.qk_rope_head_dim, 0)

    def rope_specs(self, config: ModelConfig) -> dict[str, RopeSpec]:
        params = raw_rope_parameters(config)
        theta = float(params.get("rope_theta") or config.rope_theta)
        return {
            "default": RopeSpec(
                theta=theta,
                head_dim=int(config.raw["qk_rope_head_dim"]),
                max_positions=config.max_position_embeddings,
                scaling=standard_scaling(
                    config.rope_scaling,
                    config.raw.get("original_max_position_embeddings"),
                    config.max_position_embeddings,
                ),
                interleaved=self.interleaved_rope_for(config),
            )
        }

    def interleaved_rope_for(self, config: ModelConfig) -> bool:
        return self.interleaved_rope

    def num_experts(self, config: ModelConfig) -> int:
        raw = config.raw
        return int(raw.get("n_routed_experts") or raw.get("num_local_experts") or 0)

    def is_sparse(self, config: ModelConfig, index: int) -> bool:
        first_dense = int(config.raw.get("first_k_dense_replace") or 0)
        return self.num_experts(config) > 0 and index >= first_dense

    def moe_spec(self, config: ModelConfig) -> MoESpec:
        raw = config.raw
        group_limited = raw.get("topk_method") == "group_limited_greedy"
        inter = int(raw["moe_intermediate_size"])
        return MoESpec(
            hidden_size=config.hidden_size,
            intermediate_size=inter,
            num_experts=self.num_experts(config),
            top_k=int(raw["num_experts_per_tok"]),
            routing="softmax_group" if group_limited else "softmax_topk",
            normalize=False,
            scale=float(raw.get("routed_scaling_factor") or 1.0),
            num_groups=int(raw.get("n_group") or 1),
            topk_groups=int(raw.get("topk_group") or 1),
            shared_intermediate=inter * int(raw.get("n_shared_experts") or 0),
            shared_bias=self.mlp_bias(config),
        )

    def build_layer(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        dtype, device = factory.dtype, factory.device
        if self.is_sparse(config, index):
            mlp = MoE(self.moe_spec(config), factory, activation=self.activation(config))
        else:
            mlp = self.build_mlp(config, index, factory)
        return PreNormLayer(
            LatentAttention(self.mla_spec(config), factory),
            mlp,
            RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device),
            RMSNorm(config.hidden_size, config.rms_norm_eps, dtype, device),
        )

    def attention_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        spec = self.mla_spec(config)
        a = self.layer_prefix(index) + "self_attn."
        kv_b = (a + "kv_b_proj.weight",)
        nope, heads = spec.qk_nope_head_dim, spec.num_heads
        uk = functools.partial(_kv_b_part, heads=heads, start=0, stop=nope)
        uv = functools.partial(_kv_b_part, heads=heads, start=nope, stop=nope + spec.v_head_dim)
        bindings = [
            Binding("attn.kv_a", (a + "kv_a_proj_with_mqa.weight",)),
            norm_binding("attn.kv_a_norm", a + "kv_a_layernorm.weight"),
            Binding("attn.w_uk", kv_b, uk),
            Binding("attn.w_uv", kv_b, uv),
            Binding("attn.o", (a + "o_proj.weight",)),
        ]
        if spec.q_lora_rank is None:
            bindings.append(Binding("attn.q", (a + "q_proj.weight",)))
        else:
            bindings.append(Binding("attn.q_a", (a + "q_a_proj.weight",)))
            bindings.append(norm_binding("attn.q_a_norm", a + "q_a_layernorm.weight"))
            bindings.append(Binding("attn.q_b", (a + "q_b_proj.weight",)))
        if spec.bias:
            for target, name in (
                ("q_a", "q_a_proj"),
                ("kv_a", "kv_a_proj_with_mqa"),
                ("o", "o_proj"),
            ):
                if target != "q_a" or spec.q_lora_rank is not None:
                    bindings.append(Binding(f"attn.{target}.bias", (f"{a}{name}.bias",)))
        return bindings

    def router_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        return [Binding("mlp.router", (self.layer_prefix(index) + "mlp.gate.weight",))]

    def layer_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        p = self.layer_prefix(index)
        bindings = [
            norm_binding("input_norm", p + "input_layernorm.weight"),
            norm_binding("post_norm", p + "post_attention_layernorm.weight"),
            *self.attention_bindings(config, index),
        ]
        bias = self.mlp_bias(config)  # dense and shared experts' (routed experts have none)
        if not self.is_sparse(config, index):
            return bindings + gated_mlp_bindings(p, bias=bias)
        bindings += self.router_bindings(config, index)
        bindings += expert_bindings(
            p + "mlp.experts.", self.num_experts(config), "gate_proj", "up_proj", "down_proj"
        )
        if self.moe_spec(config).shared_intermediate:
            bindings += gated_mlp_bindings(
                p, bias=bias, target="mlp.shared", module="mlp.shared_experts"
            )
        return bindings


ARCHITECTURE = DeepseekV2()
