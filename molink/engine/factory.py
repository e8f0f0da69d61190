"""Builds engines from a model name: the pieces every entry point shares."""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from molink.config import (
    ENGINE_DEFAULTS,
    CacheConfig,
    LayerRange,
    ModelConfig,
    SchedulerConfig,
)
from molink.device import resolve_device
from molink.engine import device_memory
from molink.engine.device_memory import ProfileLimits
from molink.engine.llm_engine import LLMEngine
from molink.engine.local_executor import LocalExecutor
from molink.errors import InvalidParameterError
from molink.kv_cache.manager import KVCacheManager
from molink.models.decoder import DecoderSlice
from molink.models.kv_cache import KVCache
from molink.models.parallel.check import rank_kv_config
from molink.models.rope_length import model_max_context
from molink.parallel.launch import FollowerSettings
from molink.parallel.stage import load_stage_slice
from molink.quant.config import (
    KV_CACHE_DTYPE_NAMES,
    resolve_kv_cache_dtype,
    resolve_quantization,
)
from molink.sampling.structured import GrammarCompiler, grammar_compiler_for
from molink.scheduler.scheduler import Scheduler
from molink.stage.decode_graphs import CudaGraphFactory, GraphSettings
from molink.stage.worker import StageWorker
from molink.tokenizer.tokenizer import Tokenizer
from molink.weights import ModelSource, resolve_model_source
from molink.weights.source import resolve_torch_dtype

logger = logging.getLogger(__name__)

_TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


@dataclass(frozen=True)
class EngineOptions:
    """What an engine is built from; every default is molink.config.ENGINE_DEFAULTS'."""

    model: str | None = None
    dtype: str = ENGINE_DEFAULTS.dtype
    device: str = ENGINE_DEFAULTS.device  # auto, cpu, cuda, cuda:N
    quantization: str | None = None  # None: as the checkpoint is
    quantized_batch_kernel: str = ENGINE_DEFAULTS.quantized_batch_kernel
    kv_cache_dtype: str = ENGINE_DEFAULTS.kv_cache_dtype
    max_model_len: int | None = None  # None: the model's own limit
    block_size: int = ENGINE_DEFAULTS.block_size
    kv_cache_memory_bytes: int | None = None  # None: automatic (kv_cache_bytes)
    # On a GPU, automatic means: what --gpu-memory-utilization leaves (device_memory.py).
    gpu_memory_utilization: float = ENGINE_DEFAULTS.gpu_memory_utilization
    enforce_eager: bool = False  # True: no CUDA graphs for decode steps
    num_kv_blocks: int | None = None  # set: exactly this many blocks, whatever the memory
    max_num_seqs: int = ENGINE_DEFAULTS.max_num_seqs
    max_num_batched_tokens: int = ENGINE_DEFAULTS.max_num_batched_tokens
    enable_prefix_caching: bool = ENGINE_DEFAULTS.enable_prefix_caching
    tensor_parallel_size: int = 1
    tokenizer: str | None = None  # a folder holding tokenizer.json; None: the model's
    revision: str | None = None  # of a hub model

    @property
    def kv_cache_bytes(self) -> int:
        """The KV-cache memory to size blocks from: the given bytes, else the default."""
        if self.kv_cache_memory_bytes is None:
            return ENGINE_DEFAULTS.kv_cache_memory_bytes
        return self.kv_cache_memory_bytes


def torch_dtype_for(
    source: ModelSource,
    dtype: str,
    device: torch.device | str = "cpu",
    quantization: str | None = None,
) -> torch.dtype:
    """``auto``: the checkpoint's dtype on a GPU; float32 or bfloat16 on a CPU.

    The dtype the slice will run in, as ModelSource.load_slice picks it: quantized
    matrices turn float16 into float32, and the KV cache must be sized and typed for that.
    """
    resolved = resolve_torch_dtype(dtype, source.checkpoint_dtype, device)
    method = resolve_quantization(quantization, source.detected_quantization(), device)
    if method != "none" and resolved == torch.float16:
        return torch.float32
    return resolved


def kv_cache_dtype_for(
    source: ModelSource, options: EngineOptions, dtype: torch.dtype, device: torch.device
) -> torch.dtype:
    """The KV cache's dtype: ``--kv-cache-dtype`` for the method that runs the weights."""
    method = resolve_quantization(options.quantization, source.detected_quantization(), device)
    return resolve_kv_cache_dtype(options.kv_cache_dtype, dtype, device, method)


def resolve_max_model_len(config: ModelConfig, requested: int | None) -> int:
    limit = model_max_context(config)  # dynamic NTK reaches past max_position_embeddings
    if requested is None:
        return limit
    if not 1 <= requested <= limit:
        raise InvalidParameterError(
            "max_model_len", f"{requested} must be in [1, {limit}] (the model's context)"
        )
    return requested


def num_blocks_for(
    config: ModelConfig, layer_range: LayerRange, options: EngineOptions, dtype: torch.dtype
) -> int:
    if options.num_kv_blocks is not None:
        return options.num_kv_blocks
    per_block = KVCache.bytes_per_block(
        config, layer_range.end - layer_range.start, options.block_size, dtype
    )
    num_blocks = options.kv_cache_bytes // per_block
    if num_blocks < 2:
        raise InvalidParameterError(
            "kv_cache_memory", f"{options.kv_cache_bytes} bytes hold fewer than 2 blocks"
        )
    return int(num_blocks)


def profiles_kv_memory(options: EngineOptions, device: torch.device) -> bool:
    """On a device whose allocator can be read (CUDA), without an explicit cache size, the
    cache takes what ``--gpu-memory-utilization`` leaves after the weights and a profiled
    forward at the largest batch; elsewhere ``--kv-cache-memory`` sizes it (and so do
    tensor-parallel stages, whose ranks need the size before they load)."""
    given = options.num_kv_blocks is not None or options.kv_cache_memory_bytes is not None
    return (
        device_memory.memory_probe(device) is not None
        and not given
        and options.tensor_parallel_size == 1
    )


def profiled_num_blocks(
    models: list[DecoderSlice],
    options: EngineOptions,
    kv_dtype: torch.dtype,
    max_model_len: int,
    device: torch.device,
) -> int:
    """KV blocks per stage for slices loaded on ``device`` (all in this process)."""
    memory = device_memory.memory_probe(device)
    assert memory is not None
    limits = ProfileLimits(
        options.gpu_memory_utilization,
        options.max_num_batched_tokens,
        options.max_num_seqs,
        max_model_len,
        options.block_size,
    )
    profile = device_memory.profile_memory(models, limits, kv_dtype, memory)
    per_block = sum(
        KVCache.bytes_per_block(m.config, m.num_local_layers, options.block_size, kv_dtype)
        for m in models
    )
    return device_memory.kv_blocks_that_fit(profile, limits, per_block)


def graph_settings(
    options: EngineOptions, max_model_len: int, device: torch.device
) -> GraphSettings | None:
    """CUDA graphs for decode steps on a GPU, unless --enforce-eager (or tensor-parallel:
    its ranks follow each forward through messages a graph cannot replay)."""
    if device.type != "cuda" or options.enforce_eager or options.tensor_parallel_size > 1:
        return None
    return GraphSettings(options.max_num_seqs, max_model_len, CudaGraphFactory(device))


def build_scheduler(
    options: EngineOptions, num_blocks: int, max_model_len: int, eos_token_ids: tuple[int, ...]
) -> Scheduler:
    sched_config = SchedulerConfig(
        max_num_batched_tokens=options.max_num_batched_tokens,
        max_num_seqs=options.max_num_seqs,
        max_model_len=max_model_len,
    )
    sched_config.validate()
    cache = CacheConfig(
        block_size=options.block_size,
        num_blocks=num_blocks,
        enable_prefix_caching=options.enable_prefix_caching,
    )
    kv = KVCacheManager(num_blocks, cache.block_size, cache.enable_prefix_caching)
    return Scheduler(sched_config, kv, eos_token_ids)


def build_local_engine(
    options: EngineOptions, layer_splits: list[int] | None = None, wire_dtype: str | None = None
) -> tuple[LLMEngine, ModelSource, int]:
    """An engine whose stages all live in this process.

    ``layer_splits`` (e.g. ``[7, 19]``) runs the model as several consecutive layer ranges
    handing hidden states across, exactly as the pipeline's seams do; with ``wire_dtype``
    the hand-over also goes through the wire codec (see LocalExecutor).
    Returns the engine, its model source and max_model_len.
    """
    device = resolve_device(options.device)  # before any loading: a bad device fails at once
    source = model_source(options)
    config = source.model_config
    dtype = torch_dtype_for(source, options.dtype, device, options.quantization)
    kv_dtype = kv_cache_dtype_for(source, options, dtype, device)
    max_model_len = resolve_max_model_len(config, options.max_model_len)
    bounds = [0, *(layer_splits or []), config.num_layers]
    ranges = [LayerRange.resolve(a, b, config.num_layers) for a, b in itertools.pairwise(bounds)]
    tp_size = options.tensor_parallel_size
    if tp_size > 1 and len(ranges) > 1:
        raise InvalidParameterError(
            "tensor_parallel_size", "one process runs one tensor-parallel stage, not several"
        )
    kv_config = rank_kv_config(config, tp_size)
    profile = profiles_kv_memory(options, device)
    # Profiled: sized after loading; otherwise before (tensor-parallel ranks load with it).
    num_blocks = (
        0 if profile else min(num_blocks_for(kv_config, r, options, kv_dtype) for r in ranges)
    )
    models = [
        load_stage_slice(
            source,
            r,
            dtype_name(dtype),
            options.quantization,
            tp_size,
            follower_settings(options, r, dtype, num_blocks, kv_dtype),
            device,
            batch_kernel=options.quantized_batch_kernel,
        )
        for r in ranges
    ]
    if profile:
        num_blocks = profiled_num_blocks(models, options, kv_dtype, max_model_len, device)
    stages = [
        StageWorker(
            model,
            config,
            r,
            num_blocks,
            options.block_size,
            kv_dtype,
            grammars=last_stage_grammars(source, r),
            kv_config=kv_config,
            graphs=graph_settings(options, max_model_len, device),
        )
        for model, r in zip(models, ranges, strict=True)
    ]
    tokenizer = Tokenizer.from_dir(source.tokenizer_dir)
    eos = tuple(sorted(set(config.eos_token_ids) | set(tokenizer.eos_token_ids)))
    scheduler = build_scheduler(options, num_blocks, max_model_len, eos)
    executor = LocalExecutor(stages, wire_dtype)
    engine = LLMEngine(scheduler, executor, tokenizer, vocab_size=config.vocab_size)
    return engine, source, max_model_len


def model_source(options: EngineOptions) -> ModelSource:
    """The model the options name, at their revision, with their tokenizer folder if any."""
    source = resolve_model_source(
        options.model, options.revision, quantization=options.quantization
    )
    if options.tokenizer is not None:
        source.tokenizer_dir = Path(options.tokenizer)
    return source


def follower_settings(
    options: EngineOptions,
    layers: LayerRange,
    dtype: torch.dtype,
    num_blocks: int,
    kv_dtype: torch.dtype,
) -> FollowerSettings:
    """What the other tensor-parallel ranks of a stage load: what rank 0 does. A cache
    dtype other than the model's goes by name (a follower does not know the method that
    made rank 0's ``auto`` bfloat16); the model's own stays ``auto`` (it may be float16,
    which --kv-cache-dtype does not name)."""
    kv_name = "auto" if kv_dtype == dtype else KV_CACHE_DTYPE_NAMES[kv_dtype]
    return FollowerSettings(
        model=options.model,
        start_layer=layers.start,
        end_layer=layers.end,
        dtype=dtype_name(dtype),
        kv_cache_dtype=kv_name,
        num_blocks=num_blocks,
        block_size=options.block_size,
        num_threads=torch.get_num_threads(),
        log_level=logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower(),
    )


def last_stage_grammars(source: ModelSource, layers: LayerRange) -> GrammarCompiler | None:
    """Structured output is enforced where tokens are sampled: on the last stage only."""
    config = source.model_config
    if not layers.is_last(config.num_layers):
        return None
    return grammar_compiler_for(str(source.tokenizer_dir), config.vocab_size)


def dtype_name(dtype: torch.dtype) -> str:
    return {v: k for k, v in _TORCH_DTYPES.items()}[dtype]
