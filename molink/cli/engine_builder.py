"""Builds the engine an entry point serves: a single node, or the head of a pipeline."""

from __future__ import annotations

import logging

import torch

from molink.cli.args import EngineArgs
from molink.engine.async_engine import AsyncLLMEngine
from molink.engine.factory import EngineOptions, build_local_engine

logger = logging.getLogger(__name__)


def engine_options(args: EngineArgs) -> EngineOptions:
    return EngineOptions(
        model=args.model,  # None: the default model, converted once and cached
        dtype=args.dtype,
        device=args.device,
        quantization=args.quantization,
        quantized_batch_kernel=args.quantized_batch_kernel,
        kv_cache_dtype=args.kv_cache_dtype,
        max_model_len=args.max_model_len,
        block_size=args.block_size,
        kv_cache_memory_bytes=args.kv_cache_memory,  # None: automatic
        gpu_memory_utilization=args.gpu_memory_utilization,
        enforce_eager=args.enforce_eager,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        enable_prefix_caching=args.enable_prefix_caching,
        tensor_parallel_size=args.tensor_parallel_size,
        tokenizer=args.tokenizer,
        revision=args.revision,
    )


def build_engine_client(args: EngineArgs) -> AsyncLLMEngine:
    """Single node unless ``--molink-enabled``; the pipeline head otherwise."""
    if args.seed is not None:
        torch.manual_seed(args.seed)
    options = engine_options(args)
    if args.molink_enabled:
        from molink.cli.pipeline_builder import build_pipeline_engine

        return build_pipeline_engine(args, options)
    engine, source, max_model_len = build_local_engine(options)
    return AsyncLLMEngine(engine, args.model_name, max_model_len)
