"""GGUF files (llama.cpp's format): config from metadata, tensors dequantized on demand.

Tensor names are mapped to Hugging Face's (molink.weights.gguf_names), and what llama.cpp's
converter changed (Q/K row order of llama files, Gemma's ``1 + w`` norms) is undone by the
architecture's file exactly as transformers undoes it when it loads GGUF, so that the rest
of MoLink sees one naming and one layout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

from molink.config import ModelConfig
from molink.errors import WeightLoadError
from molink.models.parallel.reading import narrow_ranges
from molink.models.registry import GGUF_ARCHITECTURES, architecture_for, architecture_named
from molink.quant.gguf_blocks import BLOCK_TYPES, decode_blocks
from molink.quant.groups import GroupInts
from molink.weights.cache import build_entry, default_cache_dir, file_key
from molink.weights.gguf_config import field_value as _field
from molink.weights.gguf_config import gguf_config_dict
from molink.weights.gguf_names import Location, gguf_locations
from molink.weights.gguf_slices import read_block_ranges
from molink.weights.packed_cache import PackedCache, cached_metadata, packed_entry_for
from molink.weights.source import ModelSource, TensorStore

logger = logging.getLogger(__name__)

# Tensor types that are plain numbers, not blocks of quantized weights.
UNQUANTIZED_TYPES = {"F32", "F16", "BF16", "F64", "I8", "I16", "I32", "I64"}
# Bumped when conversions change (2: family chat templates for files without one), so that
# cached conversions of an older MoLink are not reused.
CONVERSION_VERSION = 2


def open_reader(path: Path) -> Any:
    from gguf import GGUFReader

    if not path.is_file():
        raise WeightLoadError(f"GGUF file {path} is missing")
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # gguf raises plain ValueError/IndexError on bad files
        raise WeightLoadError(f"GGUF file {path} is truncated or corrupt: {exc}") from exc


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
        self._locations: dict[str, Location] = gguf_locations(arch, config, by_name)
        self._tensors = by_name
        self._stacked: tuple[str, np.ndarray] | None = None
        self._last_whole: tuple[str, torch.Tensor] | None = None
        # (name, dim, ranges) of every tensor read in part (tensor parallelism).
        self.read_ranges_log: list[tuple[str, int, tuple[tuple[int, int], ...]]] = []

    def names(self) -> list[str]:
        return list(self._locations)

    def close(self) -> None:
        """Drops the file's tensors: their arrays are views of the reader's memory map, which
        would stay mapped, its read pages resident, while the source keeps this store
        (``last_store``) for what it read."""
        self._tensors = {}
        self._stacked = None
        self._last_whole = None

    def describe(self) -> str:
        return self._where

    def _quantized_tensor(self, name: str) -> Any | None:
        """The file's tensor behind ``name`` when it stays quantized, else None."""
        single = self._locations[name].single
        if single is None or single[1] is not None or not self._quantized:
            return None
        tensor = self._tensors[single[0]]
        return tensor if tensor.tensor_type.name in BLOCK_TYPES else None

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        if name not in self._locations:
            raise KeyError(name)
        tensor = self._quantized_tensor(name)
        if tensor is not None:
            return tuple(int(d) for d in reversed(tensor.shape.tolist()))
        return tuple(self._whole(name).shape)

    def read_ranges(self, name: str, dim: int, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
        """A tensor-parallel rank's rows or columns: of a quantized matrix, only their
        blocks are read and decoded (molink.weights.gguf_slices); a float tensor is
        dequantized whole (as a single rank would) and cut."""
        self.read_ranges_log.append((name, dim, tuple(ranges)))
        tensor = self._quantized_tensor(name)
        if tensor is None:
            whole, self._last_whole = self._whole(name), None
            return narrow_ranges(whole, dim, ranges)
        self.read_names.append(name)
        cols, rows = (int(d) for d in tensor.shape.tolist())
        ints = read_block_ranges(
            tensor.data, tensor.tensor_type.name, (rows, cols), self._row_order(name, rows),
            dim, ranges, name,
        )  # fmt: skip
        return ints  # type: ignore[return-value]

    def _whole(self, name: str) -> torch.Tensor:
        """``self[name]``, kept for the ``read_ranges`` that follows ``tensor_shape``."""
        if self._last_whole is None or self._last_whole[0] != name:
            self._last_whole = (name, self[name])
        return self._last_whole[1]

    def _row_order(self, name: str, rows: int) -> np.ndarray | None:
        """What the architecture undoes on a quantized matrix can only be a row order (Llama's
        Q/K permutation): its undo applied to the row indices gives that order."""
        order = self._architecture.gguf_tensor(name, np.arange(rows), self._config)
        return None if np.array_equal(order, np.arange(rows)) else np.ascontiguousarray(order)

    def _read(self, name: str) -> torch.Tensor:
        location = self._locations[name]
        tensor = self._quantized_tensor(name)
        if tensor is not None:
            return self._read_quantized(name, tensor)  # type: ignore[return-value]
        parts = [self._part(gguf_name, expert) for gguf_name, expert in location.parts]
        data = parts[0] if location.join is None else location.join(parts)
        data = self._architecture.gguf_tensor(name, data, self._config)
        data = data.astype(np.float32, copy=False)
        if not data.flags.writeable or not data.flags.c_contiguous:
            data = np.array(data, order="C", copy=True)  # F32 tensors are read-only memmaps
        return torch.from_numpy(data)

    def _part(self, gguf_name: str, expert: int | None) -> np.ndarray:
        if expert is None:
            return self._dequantize(gguf_name)
        if self._stacked is None or self._stacked[0] != gguf_name:
            self._stacked = (gguf_name, self._dequantize(gguf_name))
        return self._stacked[1][expert]

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
        order = self._row_order(name, rows)
        return ints if order is None else ints.rows(torch.from_numpy(order))


def export_gguf_tokenizer(gguf_path: Path, out_dir: Path, reader: Any | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json (with the chat template) for a GGUF file.

    Conversion goes through transformers once; the result is cached by the callers.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    where, name = str(gguf_path.parent), gguf_path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    except Exception as first:
        # AutoTokenizer parses the whole config to pick a class, and knows only some of
        # llama.cpp's architectures (OLMo 2, Granite, Command-R, GLM-4, DeepSeek-V2/V3 are
        # refused, GPT-OSS files fail in its rope parser); the generic class builds the
        # tokenizer from the tokenizer metadata alone, whatever the architecture.
        logger.info("AutoTokenizer cannot read %s (%s); reading its tokenizer only", name, first)
        try:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(where, gguf_file=name)
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


def cached_gguf_tokenizer(gguf_path: Path) -> Path:
    """The tokenizer folder of ``gguf_path``, converted once, in a child process
    (molink.weights.tokenizer_child: transformers never enters this one)."""
    from molink.weights.tokenizer_child import export_in_child

    key = f"{file_key(gguf_path)}-v{CONVERSION_VERSION}"
    entry = default_cache_dir() / "tokenizers" / f"{gguf_path.stem}-{key}"
    return build_entry(
        entry,
        lambda tmp: export_in_child(gguf_path, tmp),
        {"source": str(gguf_path.resolve())},
    )


class GGUFSource(ModelSource):
    """A local .gguf file, read directly (only the slice's tensors are dequantized).

    Its metadata (config, tensor types) is kept in the packed cache
    (molink.weights.packed_cache), so a later start parses the file only if it must read
    tensors the cache lacks; quantized slices come from that cache as the kernels read them.
    """

    def __init__(self, path: Path, name: str | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        if not self.path.is_file():
            raise WeightLoadError(f"GGUF file {self.path} is missing")
        metadata = cached_metadata(self.path, self._read_metadata)
        self.config_dict = metadata["config"]
        self._tensor_types = set(metadata["tensor_types"])
        self.model_config = ModelConfig.from_hf_dict(self.config_dict)
        self.name = name or self.path.stem
        self.checkpoint_dtype = None  # dequantized weights: float32 unless asked otherwise
        self._inflation_told = False

    @cached_property
    def _reader(self) -> Any:
        return open_reader(self.path)

    def _read_metadata(self) -> dict[str, Any]:
        return {
            "config": gguf_config_dict(self._reader),
            "tensor_types": sorted({t.tensor_type.name for t in self._reader.tensors}),
        }

    def detected_quantization(self) -> str:
        """``gguf`` when the file holds block-quantized tensors MoLink keeps quantized."""
        if not self._tensor_types & set(BLOCK_TYPES):
            return "none"
        inflated = sorted(self._tensor_types - set(BLOCK_TYPES) - UNQUANTIZED_TYPES)
        if inflated and not self._inflation_told:
            # Such files still run (those tensors dequantized, as in every mode), but a
            # stage of them takes more memory than the file: say which types do that.
            self._inflation_told = True
            logger.warning(
                "%s: GGUF types %s cannot stay quantized (kept quantized: %s); their "
                "tensors are held as float32",
                self.path.name,
                ", ".join(inflated),
                ", ".join(BLOCK_TYPES),
            )
        return "gguf"

    @cached_property
    def tokenizer_dir(self) -> Path:  # type: ignore[override]
        """Converted on first use only: stages that never tokenize skip the cost.

        The file's reader is released first: an engine asks for its tokenizer once its
        slices are loaded, and the reader holds the whole file mapped (the pages its
        tensors were read from stay resident) and its parsed metadata; measured on a first
        start of SmolLM2 Q4_1 (bench/quant_memory_phases.py), ~220 MiB held while the KV
        cache was allocated. A later slice reopens the file."""
        self.__dict__.pop("_reader", None)
        return cached_gguf_tokenizer(self.path)

    def open_tensors(self) -> GGUFStore:
        return GGUFStore(self._reader, self.model_config, str(self.path))

    def open_tensors_for(self, method: str) -> GGUFStore:
        return GGUFStore(self._reader, self.model_config, str(self.path), method == "gguf")

    def packed_cache(self, method: str) -> PackedCache | None:
        return PackedCache(packed_entry_for(self.path)) if method == "gguf" else None
