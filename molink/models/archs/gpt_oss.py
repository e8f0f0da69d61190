"""GPT-OSS: attention with biases and learned sinks, sliding and full layers alternating,
YaRN rotary, and experts with a clamped GLU whose checkpoint interleaves gate and up."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import nn

from molink.config import ModelConfig
from molink.models.architecture import Binding, GGUFJoin, configured_layer_types
from molink.models.archs.llama import Llama
from molink.models.blocks.attention import AttentionSpec
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.moe import MoE, MoESpec


def _gate_up_matrix(parts: list[torch.Tensor]) -> torch.Tensor:
    """[E, H, 2I] with gate/up in alternate columns -> [E, 2I, H], gate rows first."""
    (weight,) = parts
    rows = weight.transpose(1, 2)
    return torch.cat((rows[:, 0::2], rows[:, 1::2]), dim=1)


def _gate_up_bias(parts: list[torch.Tensor]) -> torch.Tensor:
    (bias,) = parts
    return torch.cat((bias[:, 0::2], bias[:, 1::2]), dim=1)


def _down_matrix(parts: list[torch.Tensor]) -> torch.Tensor:
    (weight,) = parts  # [E, I, H] -> [E, H, I]
    return weight.transpose(1, 2)


def _interleave(parts: list[np.ndarray]) -> np.ndarray:
    """llama.cpp's separate gate and up [..., I, X] -> alternating rows [..., 2I, X]."""
    gate, up = parts
    return np.stack((gate, up), axis=-2).reshape(*gate.shape[:-2], -1, gate.shape[-1])


def _gguf_gate_up(parts: list[np.ndarray]) -> np.ndarray:
    return _interleave(parts).transpose(0, 2, 1)  # [E, 2I, H] -> the checkpoint's [E, H, 2I]


def _gguf_gate_up_bias(parts: list[np.ndarray]) -> np.ndarray:
    gate, up = parts  # [E, I] each
    return np.stack((gate, up), axis=-1).reshape(gate.shape[0], -1)


def _transposed(parts: list[np.ndarray]) -> np.ndarray:
    (weight,) = parts
    return weight.transpose(0, 2, 1)


def _same(parts: list[np.ndarray]) -> np.ndarray:
    (tensor,) = parts
    return tensor


# Checkpoint tensor suffix -> the tensors llama.cpp's converter made of it (names its
# table knows) and how to rebuild it.
_GGUF_JOINS = {
    "mlp.experts.gate_up_proj": (("gate_proj.weight", "up_proj.weight"), _gguf_gate_up),
    "mlp.experts.gate_up_proj_bias": (("gate_proj.bias", "up_proj.bias"), _gguf_gate_up_bias),
    "mlp.experts.down_proj": (("down_proj.weight",), _transposed),
    "mlp.experts.down_proj_bias": (("down_proj.bias",), _same),
}


class ClampedGlu:
    """``(clamp(up) + 1) * g * sigmoid(alpha * g)`` with ``g = min(gate, limit)``."""

    def __init__(self, alpha: float, limit: float) -> None:
        self.alpha = alpha
        self.limit = limit

    def __call__(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        gate = gate.clamp(max=self.limit)
        up = up.clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))


class GptOss(Llama):
    model_type = "gpt_oss"
    gguf_permuted_qk = False

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        layers = range(int(cfg["num_hidden_layers"]))
        cfg = {
            **cfg,
            "num_local_experts": int(field("expert_count")),
            "num_experts_per_tok": int(field("expert_used_count")),
            "intermediate_size": int(field("expert_feed_forward_length")),
            "sliding_window": int(field("attention.sliding_window")),
            # llama.cpp's fixed pattern, as transformers' default: even layers slide.
            "layer_types": [
                "sliding_attention" if i % 2 == 0 else "full_attention" for i in layers
            ],
        }
        scaling = cfg.get("rope_scaling")
        if scaling and scaling.get("rope_type") == "yarn":
            # GPT-OSS's YaRN keeps the fractional correction range (its config says
            # truncate: false); GGUF has no field for it.
            cfg["rope_scaling"] = {**scaling, "truncate": False}
        return cfg

    def gguf_join(self, name: str, config: ModelConfig) -> GGUFJoin | None:
        if name.endswith("self_attn.sinks"):
            return GGUFJoin((name + ".weight",), _same)
        for suffix, (parts, join) in _GGUF_JOINS.items():
            if name.endswith(suffix):
                prefix = name[: -len(suffix)] + "mlp.experts."
                return GGUFJoin(tuple(prefix + part for part in parts), join)
        return None

    def layer_types(self, config: ModelConfig) -> list[str]:
        # Without layer_types, sliding and full layers alternate, starting with a sliding one.
        return configured_layer_types(config, lambda i: i % 2 == 0)

    def attention_spec(self, config: ModelConfig, index: int) -> AttentionSpec:
        spec = super().attention_spec(config, index)
        return replace(spec, sinks=True)

    def mlp_bias(self, config: ModelConfig) -> bool:
        return False

    def build_mlp(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        raw = config.raw
        spec = MoESpec(
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_experts=int(raw["num_local_experts"]),
            top_k=int(raw["num_experts_per_tok"]),
            routing="topk_softmax",
            normalize=False,
            router_bias=True,
            expert_bias=True,
        )
        act = ClampedGlu(float(raw.get("swiglu_alpha", 1.702)), float(raw.get("swiglu_limit", 7.0)))
        return MoE(spec, factory, act=act)

    def mlp_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        p = self.layer_prefix(index) + "mlp."
        return [
            Binding("mlp.router", (p + "router.weight",)),
            Binding("mlp.router_bias", (p + "router.bias",)),
            Binding("mlp.gate_up", (p + "experts.gate_up_proj",), _gate_up_matrix),
            Binding("mlp.gate_up.bias", (p + "experts.gate_up_proj_bias",), _gate_up_bias),
            Binding("mlp.down", (p + "experts.down_proj",), _down_matrix),
            Binding("mlp.down.bias", (p + "experts.down_proj_bias",)),
        ]

    def layer_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        sinks = Binding("attn.sinks", (self.layer_prefix(index) + "self_attn.sinks",))
        return [*super().layer_bindings(config, index), sinks]


ARCHITECTURE = GptOss()
