"""What a model source offers a stage: config, tokenizer, and the weights of one slice."""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch

from molink.config import LayerRange, ModelConfig, normalize_dtype
from molink.errors import WeightLoadError
from molink.models.decoder import DecoderSlice, checkpoint_tensor_names
from molink.models.parallel.check import check_tensor_parallel
from molink.models.parallel.factory import ParallelLinearFactory
from molink.models.parallel.group import SINGLE, ParallelGroup
from molink.quant.awq_gptq import gptq_zero_offset, quant_settings
from molink.quant.config import checkpoint_method, fp8_block, resolve_quantization
from molink.quant.memory import RESIDENT, quant_factory, resident_weight_bytes
from molink.quant.parallel import parallel_quant_factory
from molink.weights.packed_cache import PackedCache, cacheable

logger = logging.getLogger(__name__)

_CPU_AUTO_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_torch_dtype(
    dtype: str, checkpoint_dtype: str | None, device: torch.device | str = "cpu"
) -> torch.dtype:
    """Turn a user dtype (``auto`` included) into a torch dtype.

    ``auto`` follows the checkpoint; float16 runs as float32 on CPU, where half-precision
    matmuls are slow, and an unknown checkpoint dtype means float32.
    """
    name = normalize_dtype(dtype)
    if name != "auto":
        return _DTYPES[name]
    checkpoint = normalize_dtype(checkpoint_dtype) if checkpoint_dtype in _DTYPES else "float32"
    if torch.device(device).type == "cpu":
        return _CPU_AUTO_DTYPES.get(checkpoint, torch.float32)
    return _DTYPES.get(checkpoint, torch.float32)


class TensorStore(Mapping[str, torch.Tensor]):
    """Checkpoint tensors by Hugging Face name, read from disk only when asked for.

    ``read_names`` lists what was actually read, in order, so that callers (and tests)
    can see that a stage touched only its own tensors.
    """

    def __init__(self) -> None:
        self.read_names: list[str] = []
        self._names_cache: set[str] | None = None

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every tensor name the checkpoint holds (from headers or the index; no data read)."""

    @abc.abstractmethod
    def _read(self, name: str) -> torch.Tensor: ...

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the tensors come from, for error messages."""

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._name_set():
            raise KeyError(name)
        tensor = self._read(name)
        self.read_names.append(name)
        return tensor

    def _name_set(self) -> set[str]:
        if self._names_cache is None:
            self._names_cache = set(self.names())
        return self._names_cache

    def __contains__(self, name: object) -> bool:
        return name in self._name_set()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._name_set())

    def close(self) -> None:
        """Release open files (optional)."""


class ModelSource(abc.ABC):
    """A model that stages can load: ``model_config``, ``tokenizer_dir``, ``name``."""

    model_config: ModelConfig
    tokenizer_dir: Path
    name: str
    checkpoint_dtype: str | None = None

    def __init__(self) -> None:
        # The store the latest load_slice read from: what it read, which files it opened.
        self.last_store: TensorStore | None = None

    @abc.abstractmethod
    def open_tensors(self) -> TensorStore:
        """A fresh lazy view of the checkpoint's tensors."""

    def detected_quantization(self) -> str:
        """How the checkpoint is quantized: its ``quantization_config`` method, or none."""
        return checkpoint_method(self.model_config.raw) or "none"

    def open_tensors_for(self, method: str) -> TensorStore:
        """The tensors as quantization ``method`` reads them (AWQ/GPTQ: decoded integers)."""
        store = self.open_tensors()
        if self.detected_quantization() == "fp8":
            from molink.weights.fp8_store import Fp8Store  # it subclasses TensorStore

            return Fp8Store(store, fp8_block(self.model_config.raw))
        if method in ("awq", "gptq"):
            from molink.weights.packed_int4 import PackedInt4Store  # it subclasses TensorStore

            bits, group = quant_settings(self.model_config.raw, method)
            offset = gptq_zero_offset(self.model_config.raw) if method == "gptq" else 0
            return PackedInt4Store(store, method, group, offset, bits)
        return store

    def load_slice(
        self,
        layer_range: LayerRange,
        dtype: str = "auto",
        device: torch.device | str = "cpu",
        quantization: str | None = None,
        group: ParallelGroup = SINGLE,
        batch_kernel: str = "int4",
    ) -> DecoderSlice:
        """Build the slice ``layer_range`` and read only the tensors it needs.

        The first slice also reads the embedding; the last the final norm and the LM head
        (the embedding, when tied). ``quantization`` (None: as the checkpoint is) picks how
        the matrices are held: see molink.quant.config. With a tensor-parallel ``group``
        of several ranks, this rank's shard is built and only its share of each tensor
        read (molink.models.parallel). ``batch_kernel``: how quantized matrices multiply
        batches (molink.quant.kernels).
        """
        config = self.model_config
        layer_range.validate(config.num_layers)
        method = resolve_quantization(quantization, self.detected_quantization(), device)
        torch_dtype = resolve_torch_dtype(dtype, self.checkpoint_dtype, device)
        if method != "none" and torch_dtype == torch.float16:
            torch_dtype = torch.float32  # the int4 kernels' activations go through bf16/f32
        factory = quant_factory(method, torch_dtype, torch.device(device), batch_kernel)
        if group.is_parallel:
            check_tensor_parallel(config, group.size, method)
            factory = (
                ParallelLinearFactory(torch_dtype, torch.device(device), group)
                if factory is None
                else parallel_quant_factory(factory, group)  # type: ignore[arg-type]
            )
        started = time.perf_counter()
        model = DecoderSlice(config, layer_range, torch_dtype, device, factory)
        # The cache holds what the CPU kernels read (a whole slice: not a rank's share);
        # other devices pack from the checkpoint.
        on_cpu = torch.device(device).type == "cpu" and not group.is_parallel
        cache = self.packed_cache(method) if on_cpu and cacheable(model) else None
        if cache is None or not cache.restore(model):
            self._read_checkpoint(model, method)
            if cache is not None:
                cache.save(model)
        weight_bytes = resident_weight_bytes(model)
        RESIDENT.add("weights", weight_bytes)
        logger.info(
            "loaded %s layers [%d, %d)%s as %s%s in %.2fs: %.1f MiB of weights",
            self.name,
            layer_range.start,
            layer_range.end,
            f", tensor-parallel rank {group.rank} of {group.size}" if group.is_parallel else "",
            str(torch_dtype).removeprefix("torch."),
            "" if method == "none" else f" with {method} weights",
            time.perf_counter() - started,
            weight_bytes / 2**20,
        )
        return model.eval()

    def packed_cache(self, method: str) -> PackedCache | None:
        """Where this checkpoint's weights are kept as the kernels read them, if anywhere."""
        return None

    def _read_checkpoint(self, model: DecoderSlice, method: str) -> None:
        layer_range = model.layer_range
        store = self.open_tensors_for(method)
        self.last_store = store
        try:
            needed = checkpoint_tensor_names(self.model_config, layer_range)
            missing = [name for name in needed if name not in store]
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise WeightLoadError(
                    f"{store.describe()} lacks {len(missing)} tensor(s) needed for layers "
                    f"[{layer_range.start}, {layer_range.end}): {shown}"
                )
            model.load_checkpoint_tensors(store)
        finally:
            store.close()
