"""GGUF files (llama.cpp's format): config from metadata, tensors dequantized on demand.

Tensor names are mapped to Hugging Face's, and llama.cpp's row permutation of Q and K in
llama-architecture files is undone exactly as transformers undoes it when it loads GGUF, so
that the rest of MoLink sees one naming and one layout.
"""

from __future__ import annotations

import json
import logging
import re
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molink.config import ModelConfig
from molink.errors import UnsupportedArchitectureError, WeightLoadError
from molink.models.registry import GGUF_ARCHITECTURES
from molink.models.rope import base_inv_freq, llama3_inv_freq
from molink.quant.gguf_blocks import BLOCK_TYPES, decode_blocks
from molink.quant.groups import GroupInts
from molink.weights.cache import build_entry, default_cache_dir, file_key
from molink.weights.source import ModelSource, TensorStore

logger = logging.getLogger(__name__)

EMBED_NAME = "model.embed_tokens.weight"
FINAL_NORM_NAME = "model.norm.weight"
LM_HEAD_NAME = "lm_head.weight"
_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
_GLOBAL_NAMES = {
    "token_embd.weight": EMBED_NAME,
    "output_norm.weight": FINAL_NORM_NAME,
    "output.weight": LM_HEAD_NAME,
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# llama.cpp writes Llama 3.1+ RoPE scaling as a tensor of per-frequency divisors; these are
# the published parameter sets it is computed from.
_LLAMA3_CANDIDATES = [
    {"factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    for f in (8.0, 32.0, 16.0, 4.0, 2.0)
]
_LLAMA3_ORIGINAL_CONTEXT = 8192


def hf_tensor_name(gguf_name: str) -> str | None:
    """The Hugging Face name for a GGUF tensor name, or None for tensors MoLink ignores."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        return None
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def reverse_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's interleaving of each head's rotary halves (rows of Q or K)."""
    dim = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, dim, 2, *weights.shape[1:])
    return w.swapaxes(2, 1).reshape(weights.shape)


def open_reader(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise WeightLoadError(f"GGUF file {path} is missing")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # gguf raises plain ValueError/IndexError on bad files
        raise WeightLoadError(f"GGUF file {path} is truncated or corrupt: {exc}") from exc


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config_dict(reader: Any) -> dict[str, Any]:
    """A Hugging Face-style config.json dict from GGUF metadata."""
    arch = _field(reader, "general.architecture")
    hf_arch = GGUF_ARCHITECTURES.get(arch)
    if hf_arch is None:
        raise UnsupportedArchitectureError([f"gguf:{arch}"], list(GGUF_ARCHITECTURES))
    p = f"{arch}."
    tensor_names = {t.name for t in reader.tensors}
    hidden = int(_field(reader, p + "embedding_length"))
    heads = int(_field(reader, p + "attention.head_count"))
    head_dim = _field(reader, p + "attention.key_length") or _field(
        reader, p + "rope.dimension_count"
    )
    eos = [_field(reader, f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": _MODEL_TYPES[hf_arch],
        "vocab_size": int(_vocab_size(reader, p)),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, p + "feed_forward_length")),
        "num_hidden_layers": int(_field(reader, p + "block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, p + "attention.head_count_kv", heads)),
        "head_dim": int(head_dim or hidden // heads),
        "rms_norm_eps": float(_field(reader, p + "attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, p + "rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, p + "context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        # Qwen2 always has q/k/v biases (its file says so); the flag is for all four.
        "attention_bias": "blk.0.attn_output.bias" in tensor_names,
        "hidden_act": "silu",
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": [int(e) for i, e in enumerate(eos) if e is not None and e not in eos[:i]],
        "torch_dtype": "float32",
    }
    scaling = _rope_scaling(reader, p, cfg)
    if scaling is not None:
        cfg["rope_scaling"] = scaling
    return cfg


def _vocab_size(reader: Any, prefix: str) -> int:
    size = _field(reader, prefix + "vocab_size")
    if size is not None:
        return int(size)
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return int(embed.shape[-1])


def _rope_scaling(reader: Any, prefix: str, cfg: dict[str, Any]) -> dict[str, Any] | None:
    kind = _field(reader, prefix + "rope.scaling.type")
    factor = _field(reader, prefix + "rope.scaling.factor")
    if kind in ("linear", "yarn") and factor:
        scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
        original = _field(reader, prefix + "rope.scaling.original_context_length")
        if original:
            scaling["original_max_position_embeddings"] = int(original)
        return scaling
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is None:
        return None
    return _llama3_from_freq_factors(np.asarray(freqs.data, dtype=np.float32), cfg)


def _llama3_from_freq_factors(factors: np.ndarray, cfg: dict[str, Any]) -> dict[str, Any]:
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


class GGUFStore(TensorStore):
    """Lazy, Hugging Face-named tensors of a GGUF file, dequantized to float32 when read.

    With ``quantized``, tensors of the block types molink.quant.gguf_blocks decodes come
    back as ``GroupInts`` (integers and scales, no float copy); the rest as float32.
    """

    def __init__(
        self, reader: Any, config: ModelConfig, where: str, quantized: bool = False
    ) -> None:
        super().__init__()
        self._where = where
        self._quantized = quantized
        self._tensors = {}
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name)
            if name is not None:
                self._tensors[name] = tensor
        # Only llama-architecture files carry the Q/K permutation (see transformers' GGUF
        # loader, LlamaTensorProcessor); Qwen files are stored in Hugging Face order.
        self._permuted = config.architecture == "LlamaForCausalLM"
        self._num_heads = config.num_heads
        self._num_kv_heads = config.num_kv_heads

    def names(self) -> list[str]:
        return list(self._tensors)

    def describe(self) -> str:
        return self._where

    def _read(self, name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        tensor = self._tensors[name]
        if self._quantized and tensor.tensor_type.name in BLOCK_TYPES:
            return self._read_quantized(name, tensor)  # type: ignore[return-value]
        try:
            # A plain ndarray view dequantizes faster than numpy's memmap subclass.
            data = dequantize(np.asarray(tensor.data), tensor.tensor_type)
            data = data.reshape(tuple(int(d) for d in reversed(tensor.shape.tolist())))
        except Exception as exc:
            raise WeightLoadError(
                f"cannot dequantize {tensor.name} ({tensor.tensor_type.name}) from {self._where}: "
                f"{exc}"
            ) from exc
        if self._permuted and ".self_attn.q_proj." in name:
            data = reverse_permute(data, self._num_heads)
        elif self._permuted and ".self_attn.k_proj." in name:
            data = reverse_permute(data, self._num_kv_heads)
        data = data.astype(np.float32, copy=False)
        if not data.flags.writeable or not data.flags.c_contiguous:
            data = np.array(data, order="C", copy=True)  # F32 tensors are read-only memmaps
        return torch.from_numpy(data)

    def _read_quantized(self, name: str, tensor: Any) -> GroupInts:
        cols, rows = (int(d) for d in tensor.shape.tolist())
        ints = decode_blocks(np.asarray(tensor.data), tensor.tensor_type.name, rows, cols)
        heads = self._permuted_heads(name)
        if heads is not None:
            order = reverse_permute(np.arange(rows), heads)
            ints = ints.rows(torch.from_numpy(np.ascontiguousarray(order)))
        return ints

    def _permuted_heads(self, name: str) -> int | None:
        if self._permuted and ".self_attn.q_proj." in name:
            return self._num_heads
        if self._permuted and ".self_attn.k_proj." in name:
            return self._num_kv_heads
        return None


def export_gguf_tokenizer(gguf_path: Path, out_dir: Path, reader: Any | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) for a GGUF file.

    Conversion goes through transformers once; the result is cached by the callers.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:
        raise WeightLoadError(f"cannot build a tokenizer from {gguf_path}: {exc}") from exc
    tokenizer.save_pretrained(str(out_dir))
    template = _field(
        reader if reader is not None else open_reader(gguf_path), "tokenizer.chat_template"
    )
    _put_chat_template_in_config(out_dir, template)


def _put_chat_template_in_config(out_dir: Path, template: str | None) -> None:
    """transformers 5 writes the template to chat_template.jinja; keep a copy in the config."""
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    jinja = out_dir / "chat_template.jinja"
    if template is None and jinja.is_file():
        template = jinja.read_text(encoding="utf-8")
    if template is not None:
        config["chat_template"] = template
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


def cached_gguf_tokenizer(gguf_path: Path, reader: Any | None = None) -> Path:
    entry = default_cache_dir() / "tokenizers" / f"{gguf_path.stem}-{file_key(gguf_path)}"
    return build_entry(
        entry,
        lambda tmp: export_gguf_tokenizer(gguf_path, tmp, reader),
        {"source": str(gguf_path.resolve())},
    )


class GGUFSource(ModelSource):
    """A local .gguf file, read directly (only the slice's tensors are dequantized)."""

    def __init__(self, path: Path, name: str | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        self._reader = open_reader(self.path)
        self.config_dict = gguf_config_dict(self._reader)
        self.model_config = ModelConfig.from_hf_dict(self.config_dict)
        self.name = name or self.path.stem
        self.checkpoint_dtype = None  # dequantized weights: float32 unless asked otherwise

    def detected_quantization(self) -> str:
        """``gguf`` when the file holds block-quantized tensors MoLink keeps quantized."""
        types = {tensor.tensor_type.name for tensor in self._reader.tensors}
        return "gguf" if types & set(BLOCK_TYPES) else "none"

    @cached_property
    def tokenizer_dir(self) -> Path:  # type: ignore[override]
        """Converted on first use only: stages that never tokenize skip the cost."""
        return cached_gguf_tokenizer(self.path, self._reader)

    def open_tensors(self) -> GGUFStore:
        return GGUFStore(self._reader, self.model_config, str(self.path))

    def open_tensors_for(self, method: str) -> GGUFStore:
        return GGUFStore(self._reader, self.model_config, str(self.path), method == "gguf")
