"""Hugging Face tensor names -> llama.cpp (GGUF) tensor names, per architecture.

The table is the ``gguf`` package's own (``TensorNameMap``, the one llama.cpp's converter
uses), so every architecture it maps is covered without a hand-written list. Experts are
per-expert tensors in Hugging Face checkpoints and one stacked tensor per layer in GGUF:
``...experts.{e}.gate_proj.weight`` maps to ``blk.N.ffn_gate_exps.weight``, slice ``e``.
A tensor the converter split or renamed beyond the table (GPT-OSS's interleaved gate/up,
DeepSeek's ``kv_b_proj``) is rebuilt by its architecture's ``gguf_join``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass

import numpy as np

from molink.config import LayerRange, ModelConfig
from molink.models.loading import checkpoint_tensor_names
from molink.models.registry import architecture_for

_EXPERT = re.compile(r"^(.*\.experts)\.(\d+)\.(.*)$")

Part = tuple[str, int | None]  # GGUF tensor name, expert index (None: the whole tensor)


@dataclass(frozen=True)
class Location:
    """The GGUF tensors one checkpoint tensor is read from, and how they combine."""

    parts: tuple[Part, ...]
    join: Callable[[list[np.ndarray]], np.ndarray] | None = None

    @property
    def single(self) -> Part | None:
        """The one tensor (or expert slice) this is, when nothing needs joining."""
        return self.parts[0] if self.join is None and len(self.parts) == 1 else None


def _name_map(gguf_arch: str, num_layers: int) -> Callable[[str], str | None] | None:
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next((a for a, name in MODEL_ARCH_NAMES.items() if name == gguf_arch), None)
    if arch is None:
        return None
    return get_tensor_name_map(arch, num_layers).get_name


def _part(name: str, table: Callable[[str], str | None]) -> Part | None:
    base, suffix = name.rsplit(".", 1)
    expert: int | None = None
    match = _EXPERT.match(base)
    if match is not None:
        base, expert = f"{match.group(1)}.{match.group(3)}", int(match.group(2))
    mapped = table(base)
    return None if mapped is None else (f"{mapped}.{suffix}", expert)


def gguf_locations(
    gguf_arch: str, config: ModelConfig, present: Collection[str] | None = None
) -> dict[str, Location]:
    """Where each tensor of the whole model lives in a GGUF file of ``gguf_arch``.

    With ``present`` (the file's tensor names), only tensors the file holds are located;
    a tensor the table maps but the file lacks is looked up through the architecture's
    ``gguf_join`` (the converter's other layout), and left out if that fails too.
    """
    table = _name_map(gguf_arch, config.num_layers)
    if table is None:
        return {}
    architecture = architecture_for(config)
    every = checkpoint_tensor_names(config, LayerRange(0, config.num_layers))
    locations: dict[str, Location] = {}
    for name in every:
        plain = _part(name, table)
        if plain is not None and (present is None or plain[0] in present):
            locations[name] = Location((plain,))
            continue
        joined = architecture.gguf_join(name, config)
        if joined is None:
            continue
        parts = [_part(part, table) for part in joined.parts]
        if all(p is not None and (present is None or p[0] in present) for p in parts):
            locations[name] = Location(tuple(p for p in parts if p is not None), joined.join)
    return locations
