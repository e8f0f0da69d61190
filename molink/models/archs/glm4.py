"""GLM-4 (0414): four norms per layer, q/k/v biases, gate/up fused in the checkpoint, and
rotary on the first half of each head over interleaved pairs."""

from __future__ import annotations

from typing import Any

from torch import nn

from molink.config import ModelConfig
from molink.models.architecture import (
    Binding,
    attention_bindings,
    default_rope_spec,
    norm_binding,
)
from molink.models.archs.llama import Llama
from molink.models.blocks.attention import SelfAttention
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.norms import RMSNorm
from molink.models.blocks.sandwich import SandwichLayer
from molink.models.rope import RopeSpec


class Glm4(Llama):
    model_type = "glm4"
    partial_rotary = True
    gguf_permuted_qk = False  # GLM rotates adjacent pairs, as llama.cpp does

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        head_dim = field("attention.key_length") or cfg["hidden_size"] // cfg["num_attention_heads"]
        rotary = int(field("rope.dimension_count") or head_dim // 2)
        return {
            **cfg,
            "head_dim": int(head_dim),
            "partial_rotary_factor": rotary / int(head_dim),
            # q/k/v have biases, the output projection none
            "attention_bias": field.has_tensor("blk.0.attn_q.bias"),
        }

    def qkv_bias(self, config: ModelConfig) -> bool:
        return config.attention_bias

    def o_bias(self, config: ModelConfig) -> bool:
        return False

    def mlp_bias(self, config: ModelConfig) -> bool:
        return False

    def rope_specs(self, config: ModelConfig) -> dict[str, RopeSpec]:
        return {"default": default_rope_spec(config, interleaved=True)}

    def build_layer(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.rms_norm_eps, factory.dtype, factory.device)

        return SandwichLayer(
            SelfAttention(self.attention_spec(config, index), factory),
            self.build_mlp(config, index, factory),
            pre_attn_norm=norm(),
            post_attn_norm=norm(),
            pre_mlp_norm=norm(),
            post_mlp_norm=norm(),
        )

    def layer_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        p = self.layer_prefix(index)
        return [
            norm_binding("pre_attn_norm", p + "input_layernorm.weight"),
            norm_binding("post_attn_norm", p + "post_self_attn_layernorm.weight"),
            norm_binding("pre_mlp_norm", p + "post_attention_layernorm.weight"),
            norm_binding("post_mlp_norm", p + "post_mlp_layernorm.weight"),
            *attention_bindings(p, qkv_bias=self.qkv_bias(config)),
            Binding("mlp.gate_up", (p + "mlp.gate_up_proj.weight",)),
            Binding("mlp.down", (p + "mlp.down_proj.weight",)),
        ]


ARCHITECTURE = Glm4()
