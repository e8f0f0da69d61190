"""A Hugging Face-style config.json dict from a GGUF file's metadata.

The fields every llama.cpp file shares (sizes, heads, rope base and scaling, special
tokens) are read here; what a family writes beyond them (experts, multipliers, windows,
latent attention) is read by its architecture's ``gguf_config``. llama.cpp files several
Hugging Face architectures under one name (Mixtral as ``llama``, DeepSeek-V3 as
``deepseek2``); the family's ``gguf_variant`` tells them apart.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from molink.errors import UnsupportedArchitectureError, WeightLoadError
from molink.models.registry import GGUF_ARCHITECTURES, architecture_named
from molink.models.rope import base_inv_freq, llama3_inv_freq

# llama.cpp writes Llama 3.1+ RoPE scaling as a tensor of per-frequency divisors; these are
# the published parameter sets it is computed from.
_LLAMA3_CANDIDATES = [
    {"factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    for f in (8.0, 32.0, 16.0, 4.0, 2.0)
]
_LLAMA3_ORIGINAL_CONTEXT = 8192


def field_value(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


class GGUFMetadata:
    """Metadata fields relative to the file's architecture, and its small tensors."""

    def __init__(self, reader: Any, arch: str) -> None:
        self._reader = reader
        self._prefix = f"{arch}."
        self._tensors = {tensor.name: tensor for tensor in reader.tensors}

    def __call__(self, key: str, default: Any = None) -> Any:
        absolute = key.startswith(("general.", "tokenizer."))
        return field_value(self._reader, key if absolute else self._prefix + key, default)

    def tensor(self, name: str) -> np.ndarray | None:
        from gguf.quants import dequantize

        tensor = self._tensors.get(name)
        if tensor is None:
            return None
        data = dequantize(np.asarray(tensor.data), tensor.tensor_type)
        return data.reshape(tuple(int(d) for d in reversed(tensor.shape.tolist())))

    def has_tensor(self, name: str) -> bool:
        return name in self._tensors


def gguf_config_dict(reader: Any) -> dict[str, Any]:
    """A Hugging Face-style config.json dict from GGUF metadata."""
    arch = field_value(reader, "general.architecture")
    hf_arch = GGUF_ARCHITECTURES.get(arch)
    if hf_arch is None:
        raise UnsupportedArchitectureError([f"gguf:{arch}"], list(GGUF_ARCHITECTURES))
    field = GGUFMetadata(reader, arch)
    hf_arch = architecture_named(hf_arch).gguf_variant(field) or hf_arch
    architecture = architecture_named(hf_arch)
    hidden = int(field("embedding_length"))
    heads = int(field("attention.head_count"))
    head_dim = field("attention.key_length") or field("rope.dimension_count")
    eos = [field(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    eps = field("attention.layer_norm_rms_epsilon") or field("attention.layer_norm_epsilon")
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": architecture.model_type,
        "vocab_size": _vocab_size(reader, field),
        "hidden_size": hidden,
        "intermediate_size": int(field("feed_forward_length")),
        "num_hidden_layers": int(field("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(field("attention.head_count_kv", heads)),
        "head_dim": int(head_dim or hidden // heads),
        "rms_norm_eps": float(eps or 1e-6),
        "rope_theta": float(field("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(field("context_length", 2048)),
        "tie_word_embeddings": not field.has_tensor("output.weight"),
        # Qwen2 always has q/k/v biases (its file says so); the flag is for all four.
        "attention_bias": field.has_tensor("blk.0.attn_output.bias"),
        "hidden_act": "silu",
        "bos_token_id": field("tokenizer.ggml.bos_token_id"),
        "eos_token_id": [int(e) for i, e in enumerate(eos) if e is not None and e not in eos[:i]],
        "torch_dtype": "float32",
    }
    scaling = _rope_scaling(field, cfg)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    return architecture.gguf_config(cfg, field)


def _vocab_size(reader: Any, field: GGUFMetadata) -> int:
    size = field("vocab_size")
    if size is not None:
        return int(size)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return int(embed.shape[-1])


def _rope_scaling(field: GGUFMetadata, cfg: dict[str, Any]) -> dict[str, Any] | None:
    kind = field("rope.scaling.type")
    factor = field("rope.scaling.factor")
    if kind in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        original = field("rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        for key in ("beta_fast", "beta_slow"):
            value = field(f"rope.scaling.yarn_{key}")
            if kind == "yarn" and value is not None:
                scaling[key] = float(value)
        return scaling
    freqs = field.tensor("rope_freqs.weight")
    if freqs is None:
        return None
    return llama3_from_freq_factors(np.asarray(freqs, dtype=np.float32), cfg)


def llama3_from_freq_factors(factors: np.ndarray, cfg: dict[str, Any]) -> dict[str, Any]:
    base = base_inv_freq(cfg["rope_theta"], cfg["head_dim"])
    for candidate in _LLAMA3_CANDIDATES:
        scaling = {
            "rope_type": "llama3",
            **candidate,
            "original_max_position_embeddings": _LLAMA3_ORIGINAL_CONTEXT,
        }
        expected = (base / llama3_inv_freq(base, scaling)).numpy()
        if expected.shape == factors.shape and np.allclose(expected, factors, rtol=1e-4):
            return scaling
    raise WeightLoadError(
        "GGUF rope_freqs.weight does not match any known Llama 3 RoPE scaling; "
        "MoLink supports factor 2, 4, 8, 16 or 32 with low/high frequency factors 1/4"
    )
