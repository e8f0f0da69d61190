"""StarCoder 2: LayerNorms with bias, biases on every projection, a plain GELU MLP."""

from __future__ import annotations

from typing import Any

from torch import nn

from molink.config import ModelConfig
from molink.models.architecture import Binding, attention_bindings, every_layer_slides
from molink.models.archs.llama import Llama
from molink.models.blocks.attention import SelfAttention
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.mlp import PlainMLP
from molink.models.blocks.norms import LayerNorm
from molink.models.blocks.prenorm import PreNormLayer


def _use_bias(config: ModelConfig) -> bool:
    return bool(config.raw.get("use_bias", True))


def _layer_norm(config: ModelConfig, factory: LinearFactory) -> LayerNorm:
    shape = (config.hidden_size,)
    return LayerNorm(shape, config.rms_norm_eps, True, factory.dtype, factory.device)


def _norm_bindings(target: str, prefix: str) -> list[Binding]:
    sep = "." if target else ""
    return [
        Binding(f"{target}{sep}weight", (prefix + ".weight",)),
        Binding(f"{target}{sep}bias", (prefix + ".bias",)),
    ]


class Starcoder2(Llama):
    model_type = "starcoder2"
    default_activation = "gelu_pytorch_tanh"
    gguf_permuted_qk = False

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        # llama.cpp's converter writes no window for StarCoder 2 (llama.cpp attends to the
        # whole context); a file that has one is honoured.
        window = field("attention.sliding_window")
        return {
            **cfg,
            "hidden_act": "gelu_pytorch_tanh",
            "norm_epsilon": cfg["rms_norm_eps"],
            "use_bias": field.has_tensor("blk.0.attn_output.bias"),
            "sliding_window": int(window) if window else None,
        }

    def layer_types(self, config: ModelConfig) -> list[str]:
        return every_layer_slides(config)

    def qkv_bias(self, config: ModelConfig) -> bool:
        return _use_bias(config)

    def o_bias(self, config: ModelConfig) -> bool:
        return _use_bias(config)

    def build_final_norm(self, config: ModelConfig, factory: LinearFactory) -> nn.Module:
        return _layer_norm(config, factory)

    def final_norm_bindings(self, config: ModelConfig) -> list[Binding]:
        return _norm_bindings("", "model.norm")

    def build_layer(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        mlp = PlainMLP(
            config.hidden_size,
            config.intermediate_size,
            self.activation(config),
            factory,
            _use_bias(config),
        )
        return PreNormLayer(
            SelfAttention(self.attention_spec(config, index), factory),
            mlp,
            _layer_norm(config, factory),
            _layer_norm(config, factory),
        )

    def layer_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        p = self.layer_prefix(index)
        bias = _use_bias(config)
        bindings = [
            *_norm_bindings("input_norm", p + "input_layernorm"),
            *_norm_bindings("post_norm", p + "post_attention_layernorm"),
            *attention_bindings(p, qkv_bias=bias, o_bias=bias),
            Binding("mlp.up", (p + "mlp.c_fc.weight",)),
            Binding("mlp.down", (p + "mlp.c_proj.weight",)),
        ]
        if bias:
            bindings.append(Binding("mlp.up.bias", (p + "mlp.c_fc.bias",)))
            bindings.append(Binding("mlp.down.bias", (p + "mlp.c_proj.bias",)))
        return bindings


ARCHITECTURE = Starcoder2()
