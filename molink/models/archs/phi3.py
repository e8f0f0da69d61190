"""Phi-3 / Phi-4: Llama's layer, with q/k/v and gate/up already fused in the checkpoint,
partial rotary and longrope scaling."""

from __future__ import annotations

from molink.config import ModelConfig
from molink.models.architecture import Binding, norm_binding
from molink.models.archs.llama import Llama


class Phi3(Llama):
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
