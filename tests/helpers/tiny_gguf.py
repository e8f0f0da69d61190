"""Write a tiny Hugging Face checkpoint as a GGUF file, the way llama.cpp's converter lays it out.

Names come from the gguf package's ``TensorNameMap`` (the converter's own table); what the
converter changes is redone here: Q and K rows of llama-architecture models permuted
(llama.cpp interleaves each head's rotary halves), Gemma's norms stored as ``1 + w``,
experts stacked per layer, GPT-OSS's interleaved gate/up split and its expert matrices
transposed, DeepSeek's ``kv_b_proj`` split into a transposed key part and a value part,
Phi-3's longrope factors as tensors. Tensors are F32 unless named in ``quantize``; the
tokenizer goes into the metadata (gpt2-style BPE) with the chat template.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from tests.helpers.tiny_gguf_meta import GGUF_ARCH, gguf_arch_for, write_metadata

__all__ = ["GGUF_ARCH", "permute", "write_tiny_gguf"]

_PERMUTED = ("llama", "granite")  # llama.cpp's "normal" rope on Hugging Face's halves
_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.weight$")


def permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's layout: within each head, rows (0, half, 1, half + 1, ...)."""
    half = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, 2, half, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)


def _stack_experts(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per-expert matrices -> one [E, out, in] tensor per layer and projection."""
    stacked: dict[str, list[tuple[int, np.ndarray]]] = {}
    out: dict[str, np.ndarray] = {}
    for name, array in tensors.items():
        match = _EXPERT.match(name)
        if match is None:
            out[name] = array
            continue
        key = f"{match.group(1)}.{match.group(3)}.weight"
        stacked.setdefault(key, []).append((int(match.group(2)), array))
    for key, experts in stacked.items():
        out[key] = np.stack([array for _, array in sorted(experts, key=lambda e: e[0])])
    return out


def _modify(
    name: str, array: np.ndarray, arch: str, config: dict
) -> Iterator[tuple[str, np.ndarray]]:
    """What llama.cpp's converter yields for one checkpoint tensor (Hugging Face names)."""
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    if arch in _PERMUTED and name.endswith("self_attn.q_proj.weight"):
        yield name, permute(array, heads)
    elif arch in _PERMUTED and name.endswith("self_attn.k_proj.weight"):
        yield name, permute(array, kv_heads or heads)
    elif arch.startswith("gemma") and name.endswith("norm.weight"):
        yield name, array + 1
    elif arch == "gpt-oss":
        yield from _gpt_oss(name, array)
    elif arch == "deepseek2" and name.endswith("kv_b_proj.weight"):
        nope, v = config["qk_nope_head_dim"], config["v_head_dim"]
        kv_b = array.reshape(heads, nope + v, array.shape[-1])
        yield name.replace("kv_b_proj", "k_b_proj"), kv_b[:, :nope].transpose(0, 2, 1)
        yield name.replace("kv_b_proj", "v_b_proj"), kv_b[:, nope:]
    elif name.endswith("e_score_correction_bias"):
        yield name.replace("e_score_correction_bias", "e_score_correction.bias"), array
    else:
        yield name, array


def _gpt_oss(name: str, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    if name.endswith("experts.gate_up_proj"):
        rows = array.transpose(0, 2, 1)  # [E, H, 2I] -> [E, 2I, H], gate/up alternating
        yield name.replace("gate_up_proj", "gate_proj.weight"), rows[:, 0::2]
        yield name.replace("gate_up_proj", "up_proj.weight"), rows[:, 1::2]
    elif name.endswith("experts.gate_up_proj_bias"):
        yield name.replace("gate_up_proj_bias", "gate_proj.bias"), array[:, 0::2]
        yield name.replace("gate_up_proj_bias", "up_proj.bias"), array[:, 1::2]
    elif name.endswith("experts.down_proj"):
        yield name + ".weight", array.transpose(0, 2, 1)
    elif name.endswith("experts.down_proj_bias"):
        yield name.replace("down_proj_bias", "down_proj.bias"), array
    elif name.endswith("sinks"):
        yield name + ".weight", array
    else:
        yield name, array


def _extra_tensors(arch: str, config: dict) -> dict[str, np.ndarray]:
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if arch == "phi3" and rope.get("rope_type") == "longrope":
        return {
            "rope_factors_long.weight": np.asarray(rope["long_factor"], dtype=np.float32),
            "rope_factors_short.weight": np.asarray(rope["short_factor"], dtype=np.float32),
        }
    return {}


def _gguf_tensors(arch: str, config: dict, hf_dir: Path) -> dict[str, np.ndarray]:
    import gguf

    tensors = load_file(str(hf_dir / "model.safetensors"))
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    model_arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch)
    table = gguf.get_tensor_name_map(model_arch, config["num_hidden_layers"])
    out: dict[str, np.ndarray] = {}
    for hf_name, array in _stack_experts(tensors).items():
        for name, data in _modify(hf_name, array.astype(np.float32), arch, config):
            mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
            if mapped is None:
                raise ValueError(f"the gguf table has no name for {name} ({arch})")
            out[mapped] = data
    return {**out, **_extra_tensors(arch, config)}


def write_tiny_gguf(
    hf_dir: Path,
    out_path: Path,
    *,
    drop: Iterable[str] = (),
    quantize: Iterable[str] = (),
    arch_override: str | None = None,
    raw_blocks: Mapping[str, tuple[str, np.ndarray]] | None = None,
) -> Path:
    """Write ``hf_dir`` (made by make_tiny_model) as ``out_path``.

    ``drop``: GGUF tensor names to leave out; ``quantize``: GGUF names stored as Q8_0;
    ``raw_blocks``: GGUF names stored as the given type's blocks (uint8 [rows, bytes]).
    """
    import gguf

    hf_dir = Path(hf_dir)
    config = json.loads((hf_dir / "config.json").read_text())
    arch = gguf_arch_for(config)
    writer = gguf.GGUFWriter(str(out_path), arch_override or arch)
    write_metadata(writer, arch, config)
    _write_tokenizer(writer, hf_dir)
    drop, quantize = set(drop), set(quantize)
    for name, array in _gguf_tensors(arch, config, hf_dir).items():
        if name in drop:
            continue
        if raw_blocks and name in raw_blocks:
            type_name, blocks = raw_blocks[name]
            qtype = getattr(gguf.GGMLQuantizationType, type_name)
            writer.add_tensor(name, blocks, raw_dtype=qtype)
        elif name in quantize:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)


def _write_tokenizer(writer, hf_dir: Path) -> None:
    """The tokenizer.json of make_tiny_tokenizer as gpt2-style GGUF metadata."""
    tokenizer = json.loads((hf_dir / "tokenizer.json").read_text())
    tokenizer_config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab: dict[str, int] = dict(tokenizer["model"]["vocab"])
    specials = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    vocab.update(specials)
    tokens = [""] * (max(vocab.values()) + 1)
    for token, index in vocab.items():
        tokens[index] = token
    types = [3 if t in specials else 1 for t in tokens]  # 3: control token
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(specials["<|im_start|>"])
    writer.add_eos_token_id(specials["<|im_end|>"])
    writer.add_unk_token_id(specials["<|endoftext|>"])
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer_config["chat_template"])
