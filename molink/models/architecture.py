"""What an architecture file provides, and the defaults most decoders share.

An architecture is a ``DecoderArchitecture`` subclass in its own file under
``molink/models/archs``: how to build one of its decoder layers from the shared blocks,
which checkpoint tensors fill that layer (``Binding``s), its rotary variants, its KV-cache
layout, and its config quirks. The embedding, the final norm and the LM head, and the
half-open layer-range slicing, belong to the shared decoder (molink.models.decoder).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from molink.config import ModelConfig
from molink.errors import InvalidParameterError
from molink.models.blocks.linear import LinearFactory
from molink.models.blocks.mlp import activation
from molink.models.blocks.norms import RMSNorm
from molink.models.forward_context import ForwardContext
from molink.models.rope import RopeSpec, standard_scaling
from molink.quant.config import checkpoint_method

Assemble = Callable[[list[torch.Tensor]], torch.Tensor]
# Quantized checkpoints MoLink runs: their integer tensors are read by molink.quant
# (ModelSource.load_slice gives such a slice a quantized linear factory).
_RUNNABLE_QUANTIZATION: tuple[str, ...] = ("awq", "gptq", "fp8")


@dataclass(frozen=True)
class Binding:
    """Checkpoint tensors ``names`` fill the parameter or linear layer at ``target``.

    ``target`` is a dotted attribute path inside the layer (or the final norm). Several
    names are concatenated along rows (fused q/k/v, gate/up) unless ``assemble`` says how
    to combine them (experts stacked, a transform such as Gemma's ``1 + w``).
    """

    target: str
    names: tuple[str, ...]
    assemble: Assemble | None = None


@dataclass(frozen=True)
class GGUFJoin:
    """A checkpoint tensor llama.cpp's converter split, transposed or renamed.

    ``parts`` are Hugging Face-style names the gguf package's table maps to the GGUF
    tensors it became (``.weight``/``.bias`` suffixed, experts stacked); ``join`` rebuilds
    the checkpoint tensor from those arrays, in that order.
    """

    parts: tuple[str, ...]
    join: Callable[[list[np.ndarray]], np.ndarray]


@dataclass(frozen=True)
class KVLayout:
    """Per token and layer, the cache holds ``num_heads`` keys of ``key_dim`` and values of
    ``value_dim`` (0: values are read from the first channels of the keys)."""

    num_heads: int
    key_dim: int
    value_dim: int


class DecoderLayerModule(Protocol):
    def forward(
        self,
        x: torch.Tensor,
        ctx: ForwardContext,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
    ) -> torch.Tensor:
        """The residual stream [T, hidden] in, the residual stream out."""
        ...


def raw_rope_parameters(config: ModelConfig) -> dict[str, Any]:
    """transformers 5 writes ``rope_parameters``; older configs ``rope_theta``/``rope_scaling``."""
    params = config.raw.get("rope_parameters")
    return dict(params) if isinstance(params, dict) else {}


def partial_rotary_factor(config: ModelConfig) -> float:
    params = raw_rope_parameters(config)
    return float(
        params.get("partial_rotary_factor") or config.raw.get("partial_rotary_factor") or 1
    )


def default_rope_spec(config: ModelConfig, interleaved: bool = False) -> RopeSpec:
    rotary_dim = int(config.head_dim * partial_rotary_factor(config))
    original = config.raw.get("original_max_position_embeddings")
    original = int(original) if original else None
    return RopeSpec(
        theta=config.rope_theta,
        head_dim=config.head_dim,
        max_positions=config.max_position_embeddings,
        rotary_dim=rotary_dim if rotary_dim != config.head_dim else 0,
        scaling=standard_scaling(config.rope_scaling, original, config.max_position_embeddings),
        interleaved=interleaved,
        original_max_positions=original,
    )


SLIDING, FULL = "sliding_attention", "full_attention"
LAYER_TYPES = (SLIDING, FULL)


def configured_layer_types(config: ModelConfig, slides: Callable[[int], bool]) -> list[str]:
    """The config's ``layer_types``; configs written before transformers named them leave
    them out, and each family then has transformers' pattern: ``slides(index)``."""
    types = config.raw.get("layer_types")
    if isinstance(types, list):
        return [str(t) for t in types]
    return [SLIDING if slides(i) else FULL for i in range(config.num_layers)]


def every_layer_slides(config: ModelConfig) -> list[str]:
    """The config's window holds for every layer; families whose code predates layer_types
    ignore them."""
    return [SLIDING] * config.num_layers


def check_layer_types(types: list[str], num_layers: int) -> None:
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown or len(types) != num_layers:
        raise InvalidParameterError(
            "layer_types",
            f"{types!r} must list one of {', '.join(LAYER_TYPES)} for each of the "
            f"{num_layers} layers" + (f"; {', '.join(unknown)} not supported" if unknown else ""),
        )


def check_quantization(config: ModelConfig) -> None:
    method = checkpoint_method(config.raw)  # compressed-tensors FP8 reads as fp8
    if method is None:
        return
    if method not in _RUNNABLE_QUANTIZATION:
        raise InvalidParameterError(
            "quantization_config",
            f"quant_method {method!r} is not supported; serve an unquantized checkpoint "
            "or a GGUF file",
        )


class GGUFField(Protocol):
    """A GGUF file's metadata and small tensors, as an architecture's config reads them."""

    def __call__(self, key: str, default: Any = None) -> Any:
        """The value of a metadata field; keys are relative to the architecture
        ("attention.sliding_window") unless they start with "general." or "tokenizer."."""
        ...

    def tensor(self, name: str) -> np.ndarray | None:
        """A tensor by its GGUF name (dequantized), None when the file has none."""
        ...

    def has_tensor(self, name: str) -> bool: ...


class DecoderArchitecture:
    """Defaults are Llama's; subclasses override what differs."""

    model_type = "llama"  # config.json's model_type, written when a GGUF file is converted
    # The family's chat format, for GGUF files that ship no template of their own.
    default_chat_template: str | None = None
    embed_name = "model.embed_tokens.weight"
    final_norm_prefix = "model.norm"
    lm_head_name = "lm_head.weight"
    activation_field = "hidden_act"
    default_activation = "silu"
    # Whether partial_rotary_factor applies: transformers' code of most families rotates
    # whole heads whatever the config says (Phi-3 and GLM-4 rotate a part).
    partial_rotary = False

    def layer_prefix(self, index: int) -> str:
        return f"model.layers.{index}."

    # --- config ------------------------------------------------------------------------

    def tensor_parallel_refusal(self, config: ModelConfig) -> str | None:
        """Why this model's layers cannot split across tensor-parallel ranks; None: they can
        (attention, MLPs and experts built from the shared blocks split by heads and rows)."""
        return None

    def check_config(self, config: ModelConfig) -> None:
        """Refuse, naming the field, whatever this architecture cannot run."""
        check_quantization(config)
        if config.num_kv_heads < 1 or config.num_heads % config.num_kv_heads:
            raise InvalidParameterError(
                "num_key_value_heads",
                f"{config.num_kv_heads} must divide num_attention_heads {config.num_heads}",
            )
        check_layer_types(self.layer_types(config), config.num_layers)
        factor = partial_rotary_factor(config)
        if factor != 1 and not self.partial_rotary:
            raise InvalidParameterError(
                "partial_rotary_factor",
                f"{factor} is not supported for {config.architecture}, whose attention "
                "rotates whole heads; only 1.0",
            )
        self.activation(config)
        for spec in self.rope_specs(config).values():
            spec.check()

    def activation(self, config: ModelConfig) -> Callable[[torch.Tensor], torch.Tensor]:
        name = config.raw.get(self.activation_field) or self.default_activation
        return activation(str(name), self.activation_field)

    def rope_specs(self, config: ModelConfig) -> dict[str, RopeSpec]:
        return {"default": default_rope_spec(config)}

    def kv_layout(self, config: ModelConfig) -> KVLayout:
        return KVLayout(config.num_kv_heads, config.head_dim, config.head_dim)

    def layer_types(self, config: ModelConfig) -> list[str]:
        """Per layer, whether it attends to the last ``sliding_window`` positions only
        (``sliding_attention``), as transformers' code of this family decides: Llama's
        ignores any window in the config."""
        return [FULL] * config.num_layers

    def layer_window(self, config: ModelConfig, index: int) -> int | None:
        """The sliding window of layer ``index`` (None: full attention)."""
        if config.sliding_window is None or self.layer_types(config)[index] != SLIDING:
            return None
        return config.sliding_window

    # --- the shared ends of the decoder ------------------------------------------------

    def embedding_scale(self, config: ModelConfig) -> float | None:
        return None

    def logits_scale(self, config: ModelConfig) -> float | None:
        return None

    def logits_softcap(self, config: ModelConfig) -> float | None:
        return None

    def build_final_norm(self, config: ModelConfig, factory: LinearFactory) -> nn.Module:
        return RMSNorm(config.hidden_size, config.rms_norm_eps, factory.dtype, factory.device)

    def final_norm_bindings(self, config: ModelConfig) -> list[Binding]:
        return [Binding("weight", (self.final_norm_prefix + ".weight",))]

    # --- GGUF (llama.cpp) files ---------------------------------------------------------

    def gguf_config(self, cfg: dict[str, Any], field: GGUFField) -> dict[str, Any]:
        """Complete a config.json dict built from a GGUF file's generic metadata."""
        return cfg

    def gguf_tensor(self, name: str, data: np.ndarray, config: ModelConfig) -> np.ndarray:
        """Undo llama.cpp's conversion of tensor ``name`` (a Hugging Face name)."""
        return data

    def gguf_join(self, name: str, config: ModelConfig) -> GGUFJoin | None:
        """How to rebuild ``name`` when the GGUF file does not hold it under its own name."""
        return None

    def gguf_variant(self, field: GGUFField) -> str | None:
        """The Hugging Face architecture a file of this family really holds, when llama.cpp
        files several under one name (Mixtral as ``llama``); None: this one."""
        return None

    # --- layers ------------------------------------------------------------------------

    def build_layer(self, config: ModelConfig, index: int, factory: LinearFactory) -> nn.Module:
        raise NotImplementedError

    def layer_bindings(self, config: ModelConfig, index: int) -> list[Binding]:
        raise NotImplementedError


def plus_one(parts: list[torch.Tensor]) -> torch.Tensor:
    """Gemma's norms scale by ``1 + w``; adding 1 once at load keeps one RMSNorm kernel."""
    (weight,) = parts
    return weight.float() + 1.0


def attention_bindings(
    prefix: str,
    *,
    qkv_bias: bool = False,
    o_bias: bool = False,
    qk_norm: bool = False,
    target: str = "attn",
    module: str = "self_attn",
) -> list[Binding]:
    """Separate q/k/v/o projections (the usual Hugging Face layout), fused on load."""
    p = f"{prefix}{module}."
    bindings = [
        Binding(f"{target}.qkv", tuple(f"{p}{x}_proj.weight" for x in "qkv")),
        Binding(f"{target}.o", (f"{p}o_proj.weight",)),
    ]
    if qkv_bias:
        bindings.append(Binding(f"{target}.qkv.bias", tuple(f"{p}{x}_proj.bias" for x in "qkv")))
    if o_bias:
        bindings.append(Binding(f"{target}.o.bias", (f"{p}o_proj.bias",)))
    if qk_norm:
        bindings.append(Binding(f"{target}.q_norm.weight", (f"{p}q_norm.weight",)))
        bindings.append(Binding(f"{target}.k_norm.weight", (f"{p}k_norm.weight",)))
    return bindings


def gated_mlp_bindings(
    prefix: str, *, bias: bool = False, target: str = "mlp", module: str = "mlp"
) -> list[Binding]:
    p = f"{prefix}{module}."
    bindings = [
        Binding(f"{target}.gate_up", (f"{p}gate_proj.weight", f"{p}up_proj.weight")),
        Binding(f"{target}.down", (f"{p}down_proj.weight",)),
    ]
    if bias:
        bindings.append(
            Binding(f"{target}.gate_up.bias", (f"{p}gate_proj.bias", f"{p}up_proj.bias"))
        )
        bindings.append(Binding(f"{target}.down.bias", (f"{p}down_proj.bias",)))
    return bindings


def norm_binding(target: str, name: str, assemble: Assemble | None = None) -> Binding:
    return Binding(f"{target}.weight" if target else "weight", (name,), assemble)


def _stack_pairs(parts: list[torch.Tensor]) -> torch.Tensor:
    """[gate_0, up_0, gate_1, up_1, ...] -> [E, 2 * I, H]."""
    return torch.stack([torch.cat(parts[i : i + 2]) for i in range(0, len(parts), 2)])


def _stack(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(parts)


# Assemblies that stack checkpoint matrices without changing them: a tensor-parallel rank
# may read its rows of each part and stack those (molink.models.loading).
STACKING_ASSEMBLIES: tuple[Assemble, ...] = (_stack_pairs, _stack)


def expert_bindings(
    prefix: str, num_experts: int, gate: str, up: str, down: str, target: str = "mlp"
) -> list[Binding]:
    """Per-expert checkpoint matrices ``{prefix}{e}.{gate|up|down}.weight``, stacked on load."""
    gate_up = tuple(f"{prefix}{e}.{name}.weight" for e in range(num_experts) for name in (gate, up))
    downs = tuple(f"{prefix}{e}.{down}.weight" for e in range(num_experts))
    return [
        Binding(f"{target}.gate_up", gate_up, _stack_pairs),
        Binding(f"{target}.down", downs, _stack),
    ]
