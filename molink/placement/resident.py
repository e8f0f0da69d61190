"""The bytes a node will hold for each layer of a span, counted before it loads anything.

Placement sizes a node's span by these, so they are the weights in the form the node will
hold them, read from the checkpoint's own description (safetensors headers, a GGUF file's
tensor types and shapes; no tensor data is read):

* float matrices (``--quantization none``, a GGUF file dequantized): the compute dtype's
  bytes, and on a CPU slice whose matrices allow it a second, oneDNN-packed copy beside a
  float32 one (molink.models.decoder ``PREPACK_MAX_BYTES``; a bfloat16 copy replaces the
  plain matrix);
* quantized matrices (GGUF block types, AWQ, GPTQ, on-the-fly int4/int8): the int4 planes
  of molink.quant.int4, one for integers of at most 4 bits and two above (``plane_split``),
  rows padded as the kernel packs them (``padded_rows``), a bfloat16 scale and zero point
  per group and plane, plus the float16/bfloat16 copy of ``--quantized-batch-kernel``
  fp16/bf16 (molink.quant.kernels); a float matrix of a quantized checkpoint (AWQ/GPTQ's
  embedding and head, a GGUF F16 matrix) is held in float32 (molink.quant.linear);
* experts of a mixture-of-experts layer: every expert, in the compute dtype (the experts'
  grouped matrices stay float in every mode: molink.quant.factory does not replace them);
* the embedding on a span from layer 0, the final norm and LM head on one that reaches the
  last layer (a tied head is the embedding's matrix again, shared only when one slice holds
  both ends).

A rank of a tensor-parallel stage holds its share of these (molink/placement/rank_share.py):
the figures are then one rank's, which its own device (or its share of the host) must hold.

The test (tests/unit/test_placement_resident.py) holds these figures to what a loaded
slice reports (molink.quant.memory.resident_weight_bytes).
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from molink.config import LayerRange, ModelConfig
from molink.models.cpu_linear import prepack_supported
from molink.models.decoder import PREPACK_MAX_BYTES
from molink.models.loading import checkpoint_tensor_names, head_source
from molink.models.registry import architecture_for
from molink.placement.rank_share import rank_shapes
from molink.quant.awq_gptq import PER_CHANNEL, quant_settings
from molink.quant.config import ON_THE_FLY_BITS, resolve_quantization
from molink.quant.gguf_blocks import BLOCK_TYPES, GROUP
from molink.quant.int4 import SCALE_DTYPE, padded_rows
from molink.weights.source import ModelSource

logger = logging.getLogger(__name__)

_EXPERT = re.compile(r"\.experts\.\d+\.")
_GGUF_BITS = re.compile(r"^Q(\d)_")  # Q4_0, Q5_K, Q8_0: the integers' bits
_FLOAT32 = 4


@dataclass(frozen=True)
class HeldAs:
    """How a node holds the checkpoint: ``method`` as load_slice resolves it
    (molink.quant.config), in compute ``dtype``; ``batch_kernel`` of quantized matrices;
    ``tensor_parallel_size``: the ranks its stage is split across (each holds a share)."""

    method: str
    dtype: torch.dtype
    device: torch.device = torch.device("cpu")
    batch_kernel: str = "int4"
    tensor_parallel_size: int = 1


@dataclass(frozen=True)
class Tensor:
    """One checkpoint tensor as the node will hold it: its logical shape and, when it stays
    quantized, its integers' bits and group size."""

    shape: tuple[int, ...]
    bits: int | None = None
    group: int = GROUP


@dataclass(frozen=True)
class Held:
    """Bytes of one part of a slice: ``plain``, and ``packed`` more when the slice keeps
    oneDNN-packed copies of its float matrices (``matrices``: the bytes that rule counts)."""

    plain: int = 0
    packed: int = 0
    matrices: int = 0

    def __add__(self, other: Held) -> Held:
        return Held(
            self.plain + other.plain, self.packed + other.packed, self.matrices + other.matrices
        )

    def __sub__(self, other: Held) -> Held:
        return Held(
            self.plain - other.plain, self.packed - other.packed, self.matrices - other.matrices
        )


@dataclass(frozen=True)
class WeightEstimate:
    """Per decoder layer, and for the two ends, what a node holds (see ``Held``)."""

    layers: tuple[Held, ...]
    embedding: Held
    head: Held  # the final norm and the LM head
    packs: bool  # whether float matrices may keep a packed copy on this device and dtype
    shared: Held = Held()  # of the head, what the embedding holds already (a tied model)

    def span_bytes(self, start: int, end: int) -> int:
        total = sum(self.layers[start:end], Held())
        if start == 0:
            total += self.embedding
        if end == len(self.layers):
            total += self.head
            if start == 0:
                total = total - self.shared
        return _with_copies(total, self.packs)

    def most_layers(self, budget: int, kv_per_layer: int) -> int:
        """The most layers any span of that many fits in ``budget`` with ``kv_per_layer``
        bytes of KV each: the heaviest layers count, without the ends. Not
        every smaller span need fit: a slice past ``PREPACK_MAX_BYTES`` keeps no packed
        copies, so it may hold more layers than a smaller one (the caller checks the span
        it chooses with ``span_bytes``)."""
        heaviest = sorted(self.layers, key=lambda h: h.plain + h.packed, reverse=True)
        fits, total = 0, Held()
        for count, layer in enumerate(heaviest, start=1):
            total += layer
            if _with_copies(total, self.packs) + kv_per_layer * count <= budget:
                fits = count
        return fits


def _with_copies(held: Held, packs: bool) -> int:
    keeps_copies = packs and held.matrices <= PREPACK_MAX_BYTES
    return held.plain + (held.packed if keeps_copies else 0)


def estimate_weights(source: ModelSource, held: HeldAs) -> WeightEstimate:
    """Per layer, what the node holds; with several tensor-parallel ranks, what one holds."""
    config = source.model_config
    tensors = rank_tensors(config, checkpoint_tensors(source, held.method), held)
    every = LayerRange(0, config.num_layers)
    ends = set(checkpoint_tensor_names(config, every)) - {
        n for i in range(config.num_layers) for n in _layer_names(config, i)
    }
    layers = tuple(
        sum((_held(n, tensors[n], held) for n in _layer_names(config, i)), Held())
        for i in range(config.num_layers)
    )
    arch = architecture_for(config)
    embedding = _held(arch.embed_name, tensors[arch.embed_name], held, "embedding")
    name = head_source(arch, config)
    table = _held(name, tensors[name], held, "head")
    norms = sum((_held(n, tensors[n], held) for n in ends - {arch.embed_name, name}), Held())
    # A slice holding both ends of a tied model holds the matrix once (and its copy).
    shared = Held(table.plain, embedding.packed, table.matrices)
    if not config.tie_word_embeddings:
        shared = Held()
    packs = held.device.type == "cpu" and prepack_supported(torch.empty(0, dtype=held.dtype))
    return WeightEstimate(layers, embedding, table + norms, packs, shared)


def rank_tensors(
    config: ModelConfig, tensors: dict[str, Tensor], held: HeldAs
) -> dict[str, Tensor]:
    """The tensors one rank of ``held.tensor_parallel_size`` holds (all of them for one)."""
    if held.tensor_parallel_size == 1:
        return tensors
    shapes = {name: tensor.shape for name, tensor in tensors.items()}
    shares = rank_shapes(config, shapes, held.tensor_parallel_size)
    return {name: dataclasses.replace(t, shape=shares[name]) for name, t in tensors.items()}


def _layer_names(config: ModelConfig, index: int) -> list[str]:
    arch = architecture_for(config)
    names = [n for b in arch.layer_bindings(config, index) for n in b.names]
    return list(dict.fromkeys(names))


def _held(name: str, tensor: Tensor, held: HeldAs, role: str = "layer") -> Held:
    """``role``: ``layer`` (a decoder layer's tensor), ``embedding`` or ``head``."""
    numel = 1
    for size in tensor.shape:
        numel *= size
    in_dtype = numel * held.dtype.itemsize
    if len(tensor.shape) < 2:
        return Held(in_dtype)  # norms and biases
    if len(tensor.shape) > 2 or _EXPERT.search(name):
        return Held(in_dtype, 0, in_dtype)  # grouped float experts, never packed
    if held.method == "none":
        # A packed copy of every linear layer and of the LM head, not of the embedding
        # (but of a rank's vocabulary band, which is both: VocabParallelTable); a bfloat16
        # copy serves every batch, so a layer keeps it instead of its matrix.
        band = held.tensor_parallel_size > 1 and role == "embedding"
        copy = role == "head" or band or (role == "layer" and held.dtype != torch.bfloat16)
        return Held(in_dtype, in_dtype if copy else 0, in_dtype)
    bits = ON_THE_FLY_BITS.get(held.method, tensor.bits)
    if bits is None:  # a float matrix of a quantized checkpoint: float32 (QuantLinear)
        return Held(numel * _FLOAT32)
    rows, cols = tensor.shape[0], numel // tensor.shape[0]
    return Held(int4_plane_bytes(rows, cols, bits, tensor.group, held.batch_kernel))


def int4_plane_bytes(rows: int, cols: int, bits: int, group: int, batch_kernel: str) -> int:
    """What a QuantLinear holds for a [rows, cols] matrix of ``bits``-bit integers."""
    planes = 1 if bits <= 4 else 2  # wider integers split into a high and a low plane
    padded = padded_rows(rows)
    per_plane = padded * cols // 2 + (cols // group) * padded * 2 * SCALE_DTYPE.itemsize
    wide = 2 * rows * cols if batch_kernel in ("fp16", "bf16") else 0
    return planes * per_plane + wide


def checkpoint_tensors(source: ModelSource, method: str) -> dict[str, Tensor]:
    """Every tensor of the checkpoint by Hugging Face name, described from its header."""
    from molink.weights.gguf_source import GGUFSource

    if isinstance(source, GGUFSource):
        return _gguf_tensors(source, method == "gguf")
    shapes = header_shapes(source)
    tensors = {name: Tensor(shape) for name, shape in shapes.items()}
    if method in ("awq", "gptq"):
        tensors.update(_packed_matrices(source, method, shapes))
    return tensors


def header_shapes(source: ModelSource) -> dict[str, tuple[int, ...]]:
    """Shapes from the safetensors headers. A hub model's come from ranged reads of each
    shard's header (``get_safetensors_metadata``), so that no shard is downloaded that
    the node's span does not need; where the hub cannot answer (offline), from the shards
    as the store fetches them (from the local cache)."""
    from molink.weights.hub import HubSource

    if isinstance(source, HubSource):
        from huggingface_hub import get_safetensors_metadata

        files = source.hub_files
        try:
            found = get_safetensors_metadata(files.repo_id, revision=files.revision)
        except Exception as exc:  # the hub's errors and the network's
            logger.info("reading %s's headers from its shards: %s", files.repo_id, exc)
        else:
            return {
                name: tuple(int(d) for d in info.shape)
                for file in found.files_metadata.values()
                for name, info in file.tensors.items()
            }
    store = source.open_tensors()
    try:
        return {name: _shape(store, name) for name in store.names()}
    finally:
        store.close()


def _shape(store: Any, name: str) -> tuple[int, ...]:
    return tuple(int(d) for d in store.tensor_shape(name))


def _packed_matrices(
    source: ModelSource, method: str, shapes: dict[str, tuple[int, ...]]
) -> dict[str, Tensor]:
    """AWQ/GPTQ: a matrix ``X.weight`` is ``X.qweight`` (and its scales) in the file."""
    bits, group = quant_settings(source.model_config.raw, method)
    matrices: dict[str, Tensor] = {}
    for name, packed in shapes.items():
        if not name.endswith(".qweight"):
            continue
        base = name.removesuffix(".qweight")
        out = shapes[f"{base}.scales"][1]
        cols = packed[0] if method == "awq" else packed[0] * 32 // bits
        per_channel = group == PER_CHANNEL
        matrices[f"{base}.weight"] = Tensor((out, cols), bits, cols if per_channel else group)
    return matrices


def _gguf_tensors(source: Any, quantized: bool) -> dict[str, Tensor]:
    """A GGUF file's tensors by Hugging Face name: the block types molink keeps quantized
    with their bits; expert slices of a stacked tensor as one expert's share."""
    from molink.weights.gguf_config import field_value
    from molink.weights.gguf_names import gguf_locations
    from molink.weights.gguf_source import open_reader

    reader = open_reader(source.path)
    by_name = {tensor.name: tensor for tensor in reader.tensors}
    arch = field_value(reader, "general.architecture")
    tensors: dict[str, Tensor] = {}
    for name, location in gguf_locations(arch, source.model_config, by_name).items():
        shapes = [_gguf_shape(by_name[part], expert) for part, expert in location.parts]
        shape = shapes[0] if len(shapes) == 1 else _joined(shapes)
        single = location.single
        type_name = by_name[single[0]].tensor_type.name if single is not None else ""
        kept = quantized and single is not None and single[1] is None
        bits = _GGUF_BITS.match(type_name) if kept and type_name in BLOCK_TYPES else None
        tensors[name] = Tensor(shape, None if bits is None else int(bits.group(1)))
    return tensors


def _gguf_shape(tensor: Any, expert: int | None) -> tuple[int, ...]:
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return shape if expert is None else shape[1:]


def _joined(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Parts joined along their rows (the only join whose size matters here)."""
    return (sum(s[0] for s in shapes), *shapes[0][1:])


def held_as(
    source: ModelSource,
    quantization: str | None,
    dtype: torch.dtype,
    device: torch.device,
    batch_kernel: str = "int4",
    tensor_parallel_size: int = 1,
) -> HeldAs:
    """How a node will hold ``source`` with these settings (as ModelSource.load_slice
    resolves them; ``dtype``: the compute dtype it runs in)."""
    method = resolve_quantization(quantization, source.detected_quantization(), device)
    return HeldAs(method, dtype, device, batch_kernel, tensor_parallel_size)
