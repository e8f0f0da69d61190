"""Convert a GGUF file once into a cached Hugging Face directory of float32 safetensors.

Dequantizing and building a tokenizer from GGUF metadata takes seconds; a cached directory
loads in a fraction of one (safetensors are memory-mapped and only a slice's tensors are
read). This is how the default model starts fast on every start after the first.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from molink.weights.cache import build_entry, default_cache_dir, file_key, is_complete
from molink.weights.hf_dir import SafetensorsSource, hf_dir_source

logger = logging.getLogger(__name__)


def converted_dir_for(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """Where the conversion of ``gguf_path`` (this exact version of the file) lives."""
    root = cache_dir if cache_dir is not None else default_cache_dir()
    from molink.weights.gguf_source import CONVERSION_VERSION

    key = f"{file_key(gguf_path)}-v{CONVERSION_VERSION}"
    return root / "models" / f"{gguf_path.stem}-{key}"


def convert_gguf_to_hf_dir(gguf_path: Path, out_dir: Path) -> None:
    """Write config.json, tokenizer files and model.safetensors (float32) into ``out_dir``."""
    from safetensors.torch import save_file

    from molink.config import ModelConfig
    from molink.progress import track
    from molink.weights.gguf_source import (
        GGUFStore,
        export_gguf_tokenizer,
        gguf_config_dict,
        open_reader,
    )

    started = time.perf_counter()
    reader = open_reader(gguf_path)
    config_dict = gguf_config_dict(reader)
    config = ModelConfig.from_hf_dict(config_dict)
    store = GGUFStore(reader, config, str(gguf_path))
    names = store.names()
    tensors = {
        name: store[name].contiguous()
        for name in track(names, f"converting {gguf_path.name}", unit="tensor")
    }
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    del tensors
    (out_dir / "config.json").write_text(json.dumps(config_dict, indent=2))
    export_gguf_tokenizer(gguf_path, out_dir, reader)
    logger.info("converted %s in %.1fs", gguf_path.name, time.perf_counter() - started)


def cached_gguf_as_hf_dir(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    """The converted directory for ``gguf_path``, converting on first use."""
    entry = converted_dir_for(gguf_path, cache_dir)
    if not is_complete(entry):
        logger.info("converting %s into %s (first start only)", gguf_path, entry)
    stat = gguf_path.stat()
    info = {"source": str(gguf_path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return build_entry(entry, lambda tmp: convert_gguf_to_hf_dir(gguf_path, tmp), info)


def cached_gguf_source(
    gguf_path: Path, name: str, cache_dir: Path | None = None
) -> SafetensorsSource:
    return hf_dir_source(cached_gguf_as_hf_dir(gguf_path, cache_dir), name=name)
