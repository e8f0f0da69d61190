"""A tiny llama GGUF whose every matrix (embedding and LM head too) is stored as Q8_0."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers.tiny_gguf import write_tiny_gguf

_MATRICES = ("ffn_up", "ffn_gate", "ffn_down", "attn_q", "attn_k", "attn_v", "attn_output")


def write_quantized_llama_gguf(hf_dir: Path, out_path: Path) -> Path:
    layers = json.loads((Path(hf_dir) / "config.json").read_text())["num_hidden_layers"]
    names = [f"blk.{i}.{part}.weight" for i in range(layers) for part in _MATRICES]
    names += ["token_embd.weight", "output.weight"]
    return write_tiny_gguf(hf_dir, out_path, quantize=names)
