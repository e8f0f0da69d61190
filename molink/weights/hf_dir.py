"""Hugging Face checkpoints: config.json + safetensors (single file or sharded with an index).

Only safetensors are read: ``.bin`` files are pickles, and a peer's pickle must never run.
Files are reached through a ``fetch`` callable, so that the same code reads a local
directory or downloads hub files one shard at a time, when a tensor in it is first needed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from molink.config import ModelConfig
from molink.errors import WeightLoadError
from molink.weights.source import ModelSource, TensorStore

logger = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

Fetch = Callable[[str], Path]  # repo-relative file name -> local path (raises WeightLoadError)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise WeightLoadError(f"{path} is missing") from exc
    except (OSError, ValueError) as exc:
        raise WeightLoadError(f"{path} is not readable JSON: {exc}") from exc


def load_hf_config(config_path: Path, generation_config_path: Path | None) -> ModelConfig:
    """ModelConfig from config.json, with generation_config.json's extra stop ids merged in.

    Instruct checkpoints often list their end-of-turn token only in generation_config.json
    (Llama 3: 128009); generation stops at any of them, as transformers does.
    """
    cfg = read_json(config_path)
    if generation_config_path is not None and generation_config_path.is_file():
        generation = read_json(generation_config_path)
        cfg["eos_token_id"] = merge_eos_ids(cfg.get("eos_token_id"), generation.get("eos_token_id"))
    return ModelConfig.from_hf_dict(cfg)


def merge_eos_ids(*values: int | list[int] | None) -> list[int]:
    merged: list[int] = []
    for value in values:
        for token in value if isinstance(value, list) else [value]:
            if token is not None and token not in merged:
                merged.append(int(token))
    return merged


def read_weight_map(index_path: Path) -> dict[str, str]:
    """tensor name -> shard file name, from a safetensors index."""
    index = read_json(index_path)
    weight_map = index.get("weight_map")
    if not isinstance(weight_map, dict):
        raise WeightLoadError(f"{index_path} has no 'weight_map'")
    return {str(k): str(v) for k, v in weight_map.items()}


def shards_for(weight_map: dict[str, str], names: list[str]) -> list[str]:
    """The shard files holding ``names`` (in first-use order), and no others."""
    shards: list[str] = []
    for name in names:
        shard = weight_map.get(name)
        if shard is not None and shard not in shards:
            shards.append(shard)
    return shards


def _open_safetensors(path: Path) -> Any:
    if not path.is_file():
        raise WeightLoadError(f"weight file {path} is missing")
    try:
        return safe_open(str(path), framework="pt")
    except Exception as exc:  # safetensors raises its own error type for bad files
        raise WeightLoadError(f"weight file {path} is truncated or corrupt: {exc}") from exc


class SafetensorsStore(TensorStore):
    """Lazy tensors of a safetensors checkpoint; each shard is fetched and opened on first use."""

    def __init__(self, fetch: Fetch, weight_map: dict[str, str] | None, where: str) -> None:
        super().__init__()
        self._fetch = fetch
        self._where = where
        self._handles: dict[str, Any] = {}
        self.fetched_files: list[str] = []
        # (name, dim, ranges) of every tensor read in part (tensor parallelism).
        self.read_ranges_log: list[tuple[str, int, tuple[tuple[int, int], ...]]] = []
        if weight_map is None:
            # A single file: its header lists the names.
            handle = self._handle(SINGLE_FILE)
            weight_map = dict.fromkeys(handle.keys(), SINGLE_FILE)
        self._weight_map = weight_map

    def names(self) -> list[str]:
        return list(self._weight_map)

    def describe(self) -> str:
        return self._where

    def _handle(self, file_name: str) -> Any:
        handle = self._handles.get(file_name)
        if handle is None:
            path = self._fetch(file_name)
            self.fetched_files.append(file_name)
            handle = _open_safetensors(path)
            self._handles[file_name] = handle
        return handle

    def _read(self, name: str) -> torch.Tensor:
        file_name = self._weight_map[name]
        handle = self._handle(file_name)
        try:
            return handle.get_tensor(name)
        except Exception as exc:
            raise WeightLoadError(
                f"cannot read tensor {name!r} from {self._where}/{file_name}: {exc}"
            ) from exc

    def tensor_shape(self, name: str) -> tuple[int, ...]:
        if name not in self._weight_map:
            raise KeyError(name)
        return tuple(self._handle(self._weight_map[name]).get_slice(name).get_shape())

    def read_ranges(self, name: str, dim: int, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
        """Only these rows (dim 0) or columns (dim 1) are read from the file (a
        tensor-parallel rank's share; see molink.models.parallel.reading)."""
        file_name = self._weight_map[name]
        ranges = ranges or ((0, 0),)  # a rank with no share still gets a [0, ...] tensor
        try:
            view = self._handle(file_name).get_slice(name)
            pieces = [
                view[start:stop] if dim == 0 else view[:, start:stop] for start, stop in ranges
            ]
        except Exception as exc:
            raise WeightLoadError(
                f"cannot read tensor {name!r} from {self._where}/{file_name}: {exc}"
            ) from exc
        self.read_names.append(name)
        self.read_ranges_log.append((name, dim, tuple(ranges)))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=dim)

    def close(self) -> None:
        self._handles.clear()


def local_fetch(directory: Path) -> Fetch:
    def fetch(file_name: str) -> Path:
        path = directory / file_name
        if not path.is_file():
            raise WeightLoadError(f"weight file {path} is missing")
        return path

    return fetch


class SafetensorsSource(ModelSource):
    """A Hugging Face-format model whose files are reached through ``fetch``."""

    def __init__(
        self,
        *,
        name: str,
        model_config: ModelConfig,
        tokenizer_dir: Path,
        fetch: Fetch,
        weight_map: dict[str, str] | None,
        where: str,
    ) -> None:
        super().__init__()
        self.name = name
        self.model_config = model_config
        self.tokenizer_dir = tokenizer_dir
        self.checkpoint_dtype = model_config.torch_dtype
        self._fetch = fetch
        self._weight_map = weight_map
        self._where = where

    def open_tensors(self) -> SafetensorsStore:
        return SafetensorsStore(self._fetch, self._weight_map, self._where)


def hf_dir_source(directory: Path, name: str | None = None) -> SafetensorsSource:
    """A local Hugging Face checkpoint directory."""
    directory = Path(directory)
    config = load_hf_config(directory / "config.json", directory / "generation_config.json")
    index_path = directory / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index_path.is_file():
        weight_map = read_weight_map(index_path)
    elif not (directory / SINGLE_FILE).is_file():
        bins = sorted(p.name for p in directory.glob("*.bin"))
        hint = f" (found {', '.join(bins)}: pickled weights are not loaded)" if bins else ""
        raise WeightLoadError(f"{directory} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")
    if not (directory / "tokenizer.json").is_file():
        logger.warning("%s has no tokenizer.json", directory)
    return SafetensorsSource(
        name=name or directory.name,
        model_config=config,
        tokenizer_dir=directory,
        fetch=local_fetch(directory),
        weight_map=weight_map,
        where=str(directory),
    )
