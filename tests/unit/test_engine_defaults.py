"""One set of engine defaults: the offline engine, the serving flags and --help agree."""

from __future__ import annotations

import argparse

from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.engine_builder import engine_options
from molink.config import ENGINE_DEFAULTS, SchedulerConfig
from molink.engine.factory import EngineOptions


def test_serving_flags_build_the_offline_engines_options() -> None:
    assert engine_options(EngineArgs()) == EngineOptions()


def test_help_defaults_are_the_engine_defaults() -> None:
    parsed = add_engine_args(argparse.ArgumentParser()).parse_args([])
    for name in ("dtype", "kv_cache_dtype", "block_size", "max_num_seqs"):
        assert getattr(parsed, name) == getattr(ENGINE_DEFAULTS, name), name
    assert parsed.max_num_batched_tokens == ENGINE_DEFAULTS.max_num_batched_tokens
    assert parsed.enable_prefix_caching == ENGINE_DEFAULTS.enable_prefix_caching
    assert parsed.kv_cache_memory is None  # automatic: EngineOptions.kv_cache_bytes


def test_scheduler_and_automatic_kv_sizing_read_the_same_defaults() -> None:
    config = SchedulerConfig()
    assert config.max_num_seqs == ENGINE_DEFAULTS.max_num_seqs
    assert config.max_num_batched_tokens == ENGINE_DEFAULTS.max_num_batched_tokens
    assert EngineOptions().kv_cache_bytes == ENGINE_DEFAULTS.kv_cache_memory_bytes
    assert EngineOptions(kv_cache_memory_bytes=1 << 20).kv_cache_bytes == 1 << 20
