"""Gemma 3 (text): Gemma 2's layer with RMSNorm on each head of q and k, no soft-capping by
default, and a rotary base per layer type (local layers slide, with their own base)."""

from __future__ import annotations

from typing import Any

from molink.config import ModelConfig
from molink.errors import InvalidParameterError
from molink.models.architecture import configured_layer_types
from molink.models.archs.gemma2 import Gemma2
from molink.models.rope import RopeSpec, rope_type_of

_LOCAL, _GLOBAL = "sliding_attention", "full_attention"


# llama.cpp's Gemma 3: every sixth layer attends globally, local layers rotate with base 1e4.
_GLOBAL_EVERY = 6
_LOCAL_THETA = 10000.0


class Gemma3(Gemma2):
    model_type = "gemma3_text"

    def gguf_config(self, cfg: dict[str, Any], field: Any) -> dict[str, Any]:
        cfg = super().gguf_config(cfg, field)
        layers = int(cfg["num_hidden_layers"])
        pattern = field("attention.sliding_window_pattern")
        if isinstance(pattern, list):  # newer files: one flag per layer, true = sliding
            cfg["layer_types"] = [_LOCAL if sliding else _GLOBAL for sliding in pattern]
        else:
            every = int(pattern or _GLOBAL_EVERY)
            cfg["layer_types"] = [
                _GLOBAL if (i + 1) % every == 0 else _LOCAL for i in range(layers)
            ]
        full = {"rope_type": "default", "rope_theta": cfg.pop("rope_theta")}
        scaling = cfg.pop("rope_scaling", None)
        if scaling:
            full.update(scaling)
        cfg["rope_parameters"] = {
            _LOCAL: {"rope_type": "default", "rope_theta": _LOCAL_THETA},
            _GLOBAL: full,
        }
        return cfg

    def check_config(self, config: ModelConfig) -> None:
        super().check_config(config)
        if config.raw.get("use_bidirectional_attention"):
            # transformers then attends both ways (and halves the window): an encoder.
            raise InvalidParameterError(
                "use_bidirectional_attention",
                "true is not supported; MoLink runs causal decoders only",
            )

    def qk_norm(self) -> str | None:
        return "head"

    def attention_softcap(self, config: ModelConfig) -> float | None:
        # transformers' Gemma 3 reads attn_logit_softcapping but never applies it (nor does
        # llama.cpp); the released configs say null.
        return None

    def layer_types(self, config: ModelConfig) -> list[str]:
        # Configs without layer_types say sliding_window_pattern: every n-th layer is global.
        every = int(config.raw.get("sliding_window_pattern") or _GLOBAL_EVERY)
        return configured_layer_types(config, lambda i: (i + 1) % every != 0)

    def rope_key(self, config: ModelConfig, index: int) -> str:
        return self.layer_types(config)[index]

    def rope_specs(self, config: ModelConfig) -> dict[str, RopeSpec]:
        params = config.raw.get("rope_parameters")
        if isinstance(params, dict) and _GLOBAL in params:
            per_type = {key: dict(value) for key, value in params.items()}
        else:
            # Older configs: rope_theta + rope_scaling for global layers, a local base.
            per_type = {
                _GLOBAL: {"rope_theta": config.rope_theta, **(config.rope_scaling or {})},
                _LOCAL: {"rope_theta": config.raw.get("rope_local_base_freq", 10000.0)},
            }
        return {key: self._spec(config, value) for key, value in per_type.items()}

    def _spec(self, config: ModelConfig, params: dict[str, Any]) -> RopeSpec:
        scaling = params if rope_type_of(params) != "default" else None
        return RopeSpec(
            theta=float(params.get("rope_theta", 10000.0)),
            head_dim=config.head_dim,
            max_positions=config.max_position_embeddings,
            scaling=scaling,
        )


ARCHITECTURE = Gemma3()
