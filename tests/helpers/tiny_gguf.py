"""Write a tiny Hugging Face checkpoint as a GGUF file, the way llama.cpp's converter lays it out.

Q and K rows of llama-architecture models are permuted (llama.cpp interleaves each head's
rotary halves); tensors are F32 unless named in ``quantize``; the tokenizer goes into the
metadata (gpt2-style BPE) with the chat template.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

_ARCH = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
}
_LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    part, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_LAYER_PARTS[part]}.{kind}"


def permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's layout: within each head, rows (0, half, 1, half + 1, ...)."""
    half = weights.shape[0] // num_heads // 2
    w = weights.reshape(num_heads, 2, half, *weights.shape[1:])
    return w.swapaxes(1, 2).reshape(weights.shape)


def write_tiny_gguf(
    hf_dir: Path,
    out_path: Path,
    *,
    drop: Iterable[str] = (),
    quantize: Iterable[str] = (),
    arch_override: str | None = None,
) -> Path:
    """Write ``hf_dir`` (made by make_tiny_model) as ``out_path``.

    ``drop``: GGUF tensor names to leave out; ``quantize``: GGUF names stored as Q8_0.
    """
    import gguf

    config = json.loads((Path(hf_dir) / "config.json").read_text())
    arch = arch_override or _ARCH[config["architectures"][0]]
    tensors = load_file(str(Path(hf_dir) / "model.safetensors"))
    if config.get("tie_word_embeddings"):
        tensors.pop("lm_head.weight", None)
    writer = gguf.GGUFWriter(str(out_path), arch)
    _write_config(writer, config)
    _write_tokenizer(writer, Path(hf_dir))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    drop, quantize = set(drop), set(quantize)
    names = _names_from_gguf_package(arch, config) if arch.startswith("gemma") else None
    for hf_name, array in tensors.items():
        name = gguf_name(hf_name) if names is None else names[hf_name]
        if name in drop:
            continue
        array = array.astype(np.float32)
        if arch == "llama" and ".attn_q." in name:
            array = permute(array, heads)
        elif arch == "llama" and ".attn_k." in name:
            array = permute(array, kv_heads)
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            array = array + 1  # llama.cpp stores Gemma's norms as 1 + w
        if name in quantize:
            qtype = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(out_path)


def _names_from_gguf_package(arch: str, config: dict) -> dict[str, str]:
    """Hugging Face -> GGUF names from the gguf package's table (no experts here)."""
    from molink.config import ModelConfig
    from molink.weights.gguf_names import gguf_locations

    locations = gguf_locations(arch, ModelConfig.from_hf_dict(config))
    return {hf: name for hf, (name, _) in locations.items()}


def _write_gemma2(writer, config: dict) -> None:
    writer.add_sliding_window(config["sliding_window"])
    writer.add_attn_logit_softcapping(config["attn_logit_softcapping"])
    writer.add_final_logit_softcapping(config["final_logit_softcapping"])


def _write_config(writer, config: dict) -> None:
    heads = config["num_attention_heads"]
    writer.add_name("tiny")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config["num_key_value_heads"])
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(rope.get("rope_theta") or config.get("rope_theta") or 1e4))
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    if config["architectures"][0] == "Gemma2ForCausalLM":
        _write_gemma2(writer, config)


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
