"""OLMo 2: norms on the way out of each branch only, and RMSNorm over all heads of q and k."""

from __future__ import annotations

from torch import nn

from molink.config import ModelConfig
from molink.models.architecture import Binding, attention_bindings, gated_mlp_bindings, norm_binding
from molink.models.archs.llama import Llama
from molink.models.blocks.attention import SelfAttention
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.norms import RMSNorm
from molink.models.blocks.sandwich import SandwichLayer


class Olmo2(Llama):
    model_type = "olmo2"
    gguf_permuted_qk = False

    def qk_norm(self, config: ModelConfig) -> str | None:
        return "full"

    def mlp_bias(self, config: ModelConfig) -> bool:
        return False

    def build_layer(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.rms_norm_eps, factory.dtype, factory.device)

        return SandwichLayer(
            SelfAttention(self.attention_spec(config, index), factory),
            self.build_mlp(config, index, factory),
            pre_attn_norm=None,
            post_attn_norm=norm(),
            pre_mlp_norm=None,
            post_mlp_norm=norm(),
        )

    def layer_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        p = self.layer_prefix(index)
        bias = config.attention_bias
        return [
            norm_binding("post_attn_norm", p + "post_attention_layernorm.weight"),
            norm_binding("post_mlp_norm", p + "post_feedforward_layernorm.weight"),
            *attention_bindings(p, qkv_bias=bias, o_bias=bias, qk_norm=True),
            *gated_mlp_bindings(p),
        ]


ARCHITECTURE = Olmo2()
