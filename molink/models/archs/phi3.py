"""Phi-3 / Phi-4: Llama's layer, with q/k/v and gate/up already fused in the checkpoint,
partial rotary and longrope scaling."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from molink.config import ModelConfig
from molink.models.architecture import (
    Binding,
    default_rope_spec,
    every_layer_slides,
    norm_binding,
)
from molink.models.archs.llama import Llama
from molink.models.rope import RopeSpec, rope_type_of


class Phi3(Llama):
    model_type = "phi3"
    partial_rotary = True
    gguf_permuted_qk = False

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        # Phi-3 files carry no key_length: rope.dimension_count is the rotated part only.
        head_dim = cfg["hidden_size"] // cfg["num_attention_heads"]
        cfg = {**cfg, "head_dim": head_dim}
        rotary = int(field("rope.dimension_count") or head_dim)
        if rotary != head_dim:
            cfg["partial_rotary_factor"] = rotary / head_dim
        window = field("attention.sliding_window")
        if window:
            cfg["sliding_window"] = int(window)
        original = field("rope.scaling.original_context_length")
        if original:
            cfg["original_max_position_embeddings"] = int(original)
        long, short = (
            field.tensor("rope_factors_long.weight"),
            field.tensor("rope_factors_short.weight"),
        )
        if long is not None and short is not None:
            cfg["rope_scaling"] = {
                "rope_type": "longrope",
                "long_factor": [float(x) for x in long],
                "short_factor": [float(x) for x in short],
            }
        return cfg

    def rope_specs(self, config: ModelConfig) -> dict[str, RopeSpec]:
        spec = default_rope_spec(config)
        if spec.scaling is not None and rope_type_of(spec.scaling) == "yarn":
            # Phi-3's early configs called longrope "yarn" (transformers reads them so too).
            spec = replace(spec, scaling={**spec.scaling, "rope_type": "longrope"})
        return {"default": spec}

    def layer_types(self, config: ModelConfig) -> list[str]:
        return every_layer_slides(config)

    def qkv_bias(self, config: ModelConfig) -> bool:
        return False

    def o_bias(self, config: ModelConfig) -> bool:
        return False

    def mlp_bias(self, config: ModelConfig) -> bool:
        return False

    def layer_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        p = self.layer_prefix(index)
        return [
            norm_binding("input_norm", p + "input_layernorm.weight"),
            norm_binding("post_norm", p + "post_attention_layernorm.weight"),
            Binding("attn.qkv", (p + "self_attn.qkv_proj.weight",)),
            Binding("attn.o", (p + "self_attn.o_proj.weight",)),
            Binding("mlp.gate_up", (p + "mlp.gate_up_proj.weight",)),
            Binding("mlp.down", (p + "mlp.down_proj.weight",)),
        ]


ARCHITECTURE = Phi3()
