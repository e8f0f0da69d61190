"""GGUF files (llama.cpp's format): config from metadata, tensors dequantized on demand.

Tensor names are mapped to Hugging Face's (molink.weights.gguf_names), and what llama.cpp's
converter changed (Q/K row order of llama files, Gemma's ``1 + w`` norms) is undone by the
architecture's file exactly as transformers undoes it when it loads GGUF, so that the rest
of MoLink sees one naming and one layout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molink.config import ModelConfig
from molink.errors import UnsupportedArchitectureError, WeightLoadError
from molink.models.registry import GGUF_ARCHITECTURES, architecture_for, architecture_named
from molink.models.rope import base_inv_freq, llama3_inv_freq
from molink.quant.gguf_blocks import BLOCK_TYPES, decode_blocks
from molink.quant.groups import GroupInts
from molink.weights.cache import build_entry, default_cache_dir, file_key
from molink.weights.gguf_names import gguf_locations
from molink.weights.source import ModelSource, TensorStore

logger = logging.getLogger(__name__)

# Bumped when conversions change (2: family chat templates for files without one), so that
# cached conversions of an older MoLink are not reused.
CONVERSION_VERSION = 2

EMBED_NAME = "model.embed_tokens.weight"
FINAL_NORM_NAME = "model.norm.weight"
LM_HEAD_NAME = "lm_head.weight"
# llama.cpp writes Llama 3.1+ RoPE scaling as a tensor of per-frequency divisors; these are
# the published parameter sets it is computed from.
_LLAMA3_CANDIDATES = [
    {"factor": f, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    for f in (8.0, 32.0, 16.0, 4.0, 2.0)
]
_LLAMA3_ORIGINAL_CONTEXT = 8192


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
    architecture = architecture_named(hf_arch)
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
        "model_type": architecture.model_type,
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
    return architecture.gguf_config(cfg, _field_reader(reader, p))


def _field_reader(reader: Any, prefix: str) -> Callable[..., Any]:
    def field(key: str, default: Any = None) -> Any:
        absolute = key.startswith(("general.", "tokenizer."))
        return _field(reader, key if absolute else prefix + key, default)

    return field


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

    Names map through the ``gguf`` package's own table for the file's architecture; an
    expert of a mixture-of-experts layer is one slice of llama.cpp's stacked tensor, and
    that stacked tensor is dequantized once for all the experts a stage reads.

    With ``quantized``, tensors of the block types molink.quant.gguf_blocks decodes come
    back as ``GroupInts`` (integers and scales, no float copy); the rest as float32.
    """

    def __init__(
        self, reader: Any, config: ModelConfig, where: str, quantized: bool = False
    ) -> None:
        super().__init__()
        self._where = where
        self._quantized = quantized
        self._config = config
        self._architecture = architecture_for(config)
        by_name = {tensor.name: tensor for tensor in reader.tensors}
        arch = _field(reader, "general.architecture")
        self._locations = {
            hf: location
            for hf, location in gguf_locations(arch, config).items()
            if location[0] in by_name
        }
        self._tensors = by_name
        self._stacked: tuple[str, np.ndarray] | None = None

    def names(self) -> list[str]:
        return list(self._locations)

    def describe(self) -> str:
        return self._where

    def _read(self, name: str) -> torch.Tensor:
        gguf_name, expert = self._locations[name]
        tensor = self._tensors[gguf_name]
        if expert is None and self._quantized and tensor.tensor_type.name in BLOCK_TYPES:
            return self._read_quantized(name, tensor)  # type: ignore[return-value]
        if expert is None:
            data = self._dequantize(gguf_name)
        else:
            if self._stacked is None or self._stacked[0] != gguf_name:
                self._stacked = (gguf_name, self._dequantize(gguf_name))
            data = self._stacked[1][expert]
        data = self._architecture.gguf_tensor(name, data, self._config)
        data = data.astype(np.float32, copy=False)
        if not data.flags.writeable or not data.flags.c_contiguous:
            data = np.array(data, order="C", copy=True)  # F32 tensors are read-only memmaps
        return torch.from_numpy(data)

    def _dequantize(self, gguf_name: str) -> np.ndarray:
        from gguf.quants import dequantize

        tensor = self._tensors[gguf_name]
        try:
            # A plain ndarray view dequantizes faster than numpy's memmap subclass.
            data = dequantize(np.asarray(tensor.data), tensor.tensor_type)
            return data.reshape(tuple(int(d) for d in reversed(tensor.shape.tolist())))
        except Exception as exc:
            raise WeightLoadError(
                f"cannot dequantize {tensor.name} ({tensor.tensor_type.name}) from {self._where}: "
                f"{exc}"
            ) from exc

    def _read_quantized(self, name: str, tensor: Any) -> GroupInts:
        cols, rows = (int(d) for d in tensor.shape.tolist())
        ints = decode_blocks(np.asarray(tensor.data), tensor.tensor_type.name, rows, cols)
        # What the architecture undoes on a quantized matrix can only be a row order (Llama's
        # Q/K permutation): its undo applied to the row indices gives that order.
        order = self._architecture.gguf_tensor(name, np.arange(rows), self._config)
        if not np.array_equal(order, np.arange(rows)):
            ints = ints.rows(torch.from_numpy(np.ascontiguousarray(order)))
        return ints


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
    reader = reader if reader is not None else open_reader(gguf_path)
    template = _field(reader, "tokenizer.chat_template")
    if template is None:
        # No template in the file: the family's own format, if its architecture has one.
        hf_arch = GGUF_ARCHITECTURES.get(_field(reader, "general.architecture"))
        if hf_arch is not None:
            template = architecture_named(hf_arch).default_chat_template
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
    key = f"{file_key(gguf_path)}-v{CONVERSION_VERSION}"
    entry = default_cache_dir() / "tokenizers" / f"{gguf_path.stem}-{key}"
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
