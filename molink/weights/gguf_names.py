"""Hugging Face tensor names -> llama.cpp (GGUF) tensor names, per architecture.

The table is the ``gguf`` package's own (``TensorNameMap``, the one llama.cpp's converter
uses), so every architecture it maps is covered without a hand-written list. Experts are
per-expert tensors in Hugging Face checkpoints and one stacked tensor per layer in GGUF:
``...experts.{e}.gate_proj.weight`` maps to ``blk.N.ffn_gate_exps.weight``, slice ``e``.
"""

from __future__ import annotations

import re

from molink.config import LayerRange, ModelConfig
from molink.models.loading import checkpoint_tensor_names

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")

Location = tuple[str, int | None]  # GGUF tensor name, expert index (None: whole tensor)


def gguf_locations(gguf_arch: str, config: ModelConfig) -> dict[str, Location]:
    """Where each tensor of the whole model lives in a GGUF file of ``gguf_arch``."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((a for a, name in MODEL_ARCH_NAMES.items() if name == gguf_arch), None)
    if arch is None:
        return {}
    table = get_tensor_name_map(arch, config.num_layers)
    every = checkpoint_tensor_names(config, LayerRange(0, config.num_layers))
    locations: dict[str, Location] = {}
    for name in every:
        base, suffix = name.rsplit(".", 1)
        expert: int | None = None
        match = _EXPERT.match(base)
        if match is not None:
            base, expert = f"{match.group(1)}.{match.group(3)}", int(match.group(2))
        mapped = table.get_name(base)
        if mapped is not None:
            locations[name] = (f"{mapped}.{suffix}", expert)
    return locations
