"""A GGUF model's quantized weights cached on disk as the kernels read them.

Decoding GGUF blocks and packing them for the int4 kernel takes seconds per start, and
parsing the file's metadata (tens of thousands of tokenizer strings) longer still. The
cache keeps, per GGUF file version, its config and one safetensors file per part of the
model (the embedding, each layer, the final norm, the head) holding each quantized
matrix's packed int4 planes and bfloat16 scales exactly as they sit in memory: no float
copy of a quantized matrix is written, and a start reads only its slice's files.

The packed layout belongs to the torch build (molink.quant.int4.packed_block), so the
entry is keyed by torch's version and that block as well as by the file and by
``CONVERSION_VERSION``. Files appear by an atomic rename; a slice whose parts are not all
cached loads from the GGUF file and writes the missing parts. A part's float tensors (the
norms) are held in the dtype its slice runs in, so each dtype other than float32 has its
own part files (``layer-00000.bfloat16.safetensors``): a float32 start after a bfloat16 one
would otherwise get bfloat16-rounded norms.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import nn

from molink.errors import WeightLoadError
from molink.quant.int4 import packed_block
from molink.quant.linear import QuantLinear
from molink.weights.aligned_safetensors import aligned
from molink.weights.aligned_safetensors import write as write_aligned
from molink.weights.cache import build_entry, default_cache_dir, file_key

logger = logging.getLogger(__name__)

# Bumped when what a part file holds changes (2: a matrix of two planes is saved joined,
# as the kernel reads it; 3: tensors start on 64-byte boundaries, molink.weights.
# aligned_safetensors).
PACKED_VERSION = 3
METADATA_FILE = "gguf-metadata.json"
_INFO_KEY = "molink.quant"


def packed_entry_for(gguf_path: Path, cache_dir: Path | None = None) -> Path:
    from molink.weights.gguf_source import CONVERSION_VERSION

    root = cache_dir if cache_dir is not None else default_cache_dir()
    build = f"torch{torch.__version__}-b{packed_block()}".replace("+", "_")
    key = f"{file_key(gguf_path)}-v{CONVERSION_VERSION}.{PACKED_VERSION}-{build}"
    return root / "packed" / f"{gguf_path.stem}-{key}"


def cached_metadata(
    gguf_path: Path, read: Callable[[], dict[str, Any]], cache_dir: Path | None = None
) -> dict[str, Any]:
    """What ``read()`` makes of the file's metadata (JSON), computed on the first start only.

    A cache that cannot be written (a read-only home) or whose file is damaged costs the
    parse, nothing else."""
    entry = packed_entry_for(gguf_path, cache_dir)

    def build(tmp: Path) -> None:
        (tmp / METADATA_FILE).write_text(json.dumps(read(), indent=2))

    try:
        build_entry(entry, build, {"source": str(gguf_path.resolve())})
        return json.loads((entry / METADATA_FILE).read_text())
    except (OSError, json.JSONDecodeError) as exc:  # unwritable, or a damaged file
        logger.warning("cannot use the weights cache %s (%s); reading %s", entry, exc, gguf_path)
        return read()


def _parts(model: nn.Module) -> dict[str, nn.Module]:
    """The slice's cacheable parts by a name that does not depend on its layer range."""
    start = model.layer_range.start  # type: ignore[union-attr]
    parts: dict[str, nn.Module] = {
        f"layer-{start + offset:05d}": layer
        for offset, layer in enumerate(model.layers)  # type: ignore[arg-type]
    }
    for name, attr in (("embed", "embed"), ("final-norm", "final_norm"), ("head", "lm_head")):
        module = getattr(model, attr, None)
        if isinstance(module, nn.Module) and not (attr == "lm_head" and module is model.embed):
            parts[name] = module
    return parts


def cacheable(model: nn.Module) -> bool:
    """Only slices whose tables are quantized layers (a float table is a bare tensor)."""
    return all(
        isinstance(getattr(model, attr, None), (QuantLinear, type(None)))
        for attr in ("embed", "lm_head")
    )


def _part_state(part: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    infos: dict[str, Any] = {}
    for name, module in part.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, QuantLinear):
            state, info = module.saved_state()
            tensors.update({f"{prefix}{key}": t.contiguous() for key, t in state.items()})
            infos[name] = info
        for pname, param in module.named_parameters(recurse=False):
            tensors[f"{prefix}{pname}"] = param.detach().contiguous()
    return tensors, infos


def _restore_part(part: nn.Module, tensors: dict[str, torch.Tensor], infos: dict[str, Any]) -> None:
    for name, module in part.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, QuantLinear):
            own = {
                key.removeprefix(prefix): t
                for key, t in tensors.items()
                if key.startswith(prefix) and "." not in key.removeprefix(prefix)
            }
            own.pop("bias", None)
            module.restore_state(own, infos[name])
        for pname, param in module.named_parameters(recurse=False):
            saved = tensors[f"{prefix}{pname}"]
            if saved.shape != param.shape:
                raise WeightLoadError(
                    f"cached {prefix}{pname} has shape {tuple(saved.shape)}, "
                    f"expected {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(saved)


def _part_file(entry: Path, name: str, model: nn.Module) -> Path:
    """Where part ``name`` of ``model`` is cached: float32 parts keep the plain name."""
    dtype = getattr(model, "dtype", torch.float32)
    suffix = "" if dtype == torch.float32 else "." + str(dtype).removeprefix("torch.")
    return entry / f"{name}{suffix}.safetensors"


def _read_part(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A part file's tensors and their descriptions (QuantLinear.saved_state)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        infos = json.loads((handle.metadata() or {}).get(_INFO_KEY, "{}"))
        # Views of the mapped file; a tensor off a cache line (one that follows a tensor
        # whose size is not a multiple of 64 bytes) is copied (aligned_safetensors).
        tensors = {key: aligned(handle.get_tensor(key)) for key in handle.keys()}  # noqa: SIM118
    return tensors, infos


class PackedCache:
    """One GGUF file's cached parts (see the module doc)."""

    def __init__(self, entry: Path) -> None:
        self.entry = entry

    def restore(self, model: nn.Module) -> bool:
        """Fill ``model`` from the cache; False if a part is missing or cannot be used (the
        caller then reads the whole slice from the GGUF file, and ``save`` rewrites it)."""
        parts = _parts(model)
        files = {name: _part_file(self.entry, name, model) for name in parts}
        if not all(path.is_file() for path in files.values()):
            return False
        for name, part in parts.items():
            try:
                _restore_part(part, *_read_part(files[name]))
            except (
                SafetensorError,
                OSError,
                ValueError,
                KeyError,
                RuntimeError,
                WeightLoadError,
            ) as exc:
                # Cut short (a full disk, an interrupted copy) or not what this slice holds:
                # dropped, so that the slice read from the file writes it again.
                logger.warning(
                    "cached weights %s cannot be used (%s); reading the file", files[name], exc
                )
                with contextlib.suppress(OSError):  # a read-only cache: the file stays
                    files[name].unlink(missing_ok=True)
                return False
        return True

    def save(self, model: nn.Module) -> None:
        """Write the parts of ``model`` the cache lacks (each file by an atomic rename)."""
        try:
            self._write_missing(model)
        except OSError as exc:  # a full or read-only disk costs the next start time only
            logger.warning("cannot write packed weights to %s: %s", self.entry, exc)

    def _write_missing(self, model: nn.Module) -> None:
        self.entry.mkdir(parents=True, exist_ok=True)
        for name, part in _parts(model).items():
            path = _part_file(self.entry, name, model)
            if path.is_file():
                continue
            tensors, infos = _part_state(part)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=self.entry)
            os.close(fd)
            try:
                write_aligned(tmp, tensors, {_INFO_KEY: json.dumps(infos)})
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        logger.info("cached packed weights in %s", self.entry)
