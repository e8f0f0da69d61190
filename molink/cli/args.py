"""The serving flags shared by ``molink serve``, ``molink stage`` and the module entry points.

Flag names and meanings follow vLLM and the MoLink README; ``EngineArgs`` is what the engine
builder receives. Invalid combinations raise InvalidParameterError naming the field.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field, fields

from molink.cli.cors_args import add_cors_args
from molink.cli.default_model import (
    DEFAULT_MODEL_NAME,
    EMBEDDED_MODEL_PACKAGE,
    embedded_model_path,
)
from molink.cli.flag_values import check_choice, check_port, check_positive, parse_size
from molink.cli.pipeline_args import (
    DHT_CHOICES,
    TRANSMISSION_SCHEDULING_CHOICES,
    WIRE_DTYPE_CHOICES,
    add_pipeline_args,
    validate_pipeline_layout,
    validate_pipeline_settings,
)
from molink.cli.security_args import add_security_args, validate_security_args
from molink.cli.serving_args import (
    API_KEY_ENV,
    DTYPE_ALIASES,
    DTYPE_CHOICES,
    LOG_LEVEL_CHOICES,
    VLLM_API_KEY_ENV,
    add_serving_args,
)
from molink.cli.vllm_api_args import DEFAULT_MAX_LOGPROBS, ignored_api_flags, validate_api_flags
from molink.cli.vllm_args import add_vllm_args, ignored_vllm_flags, validate_vllm_flags
from molink.cli.vllm_compat_flags import compat_notes, compat_values, validate_compat_flags
from molink.cli.vllm_loading_args import (
    QUANTIZATION_ALIASES,
    ignored_loading_flags,
    kv_cache_dtype_name,
    validate_loading_flags,
)
from molink.config import ENGINE_DEFAULTS
from molink.device import check_device_text
from molink.errors import InvalidParameterError
from molink.quant.config import check_kv_cache_dtype, check_quantization_choice
from molink.quant.kernels import check_batch_kernel

# Imported from here by the entry points, tests and benchmarks.
__all__ = [
    "API_KEY_ENV",
    "DEFAULT_MODEL_NAME",
    "DHT_CHOICES",
    "DTYPE_CHOICES",
    "LOG_LEVEL_CHOICES",
    "TRANSMISSION_SCHEDULING_CHOICES",
    "WIRE_DTYPE_CHOICES",
    "EngineArgs",
    "add_engine_args",
    "embedded_model_path",
    "parse_size",
]


@dataclass(frozen=True)
class EngineArgs:
    """Everything needed to build the engine and serve it; defaults match ``--help``."""

    model: str | None = None  # None: the embedded default model
    served_model_name: str | None = None
    served_model_aliases: tuple[str, ...] = ()  # further --served-model-name names
    host: str = "0.0.0.0"
    port: int = 8000
    dtype: str = ENGINE_DEFAULTS.dtype
    device: str = ENGINE_DEFAULTS.device
    quantization: str | None = None  # None: as the checkpoint is (molink.quant.config)
    quantized_batch_kernel: str = ENGINE_DEFAULTS.quantized_batch_kernel
    kv_cache_dtype: str = ENGINE_DEFAULTS.kv_cache_dtype
    max_model_len: int | None = None  # None: the model's own limit
    tensor_parallel_size: int = 1
    api_key: str | None = None
    max_num_seqs: int = ENGINE_DEFAULTS.max_num_seqs
    max_num_batched_tokens: int = ENGINE_DEFAULTS.max_num_batched_tokens
    block_size: int = ENGINE_DEFAULTS.block_size
    kv_cache_memory: int | None = None  # bytes; None: automatic (molink.engine.factory)
    num_threads: int | None = None  # torch threads; None: torch's default
    seed: int = 0
    log_level: str = "info"
    molink_enabled: bool = False
    molink_grpc_port: int = 50061
    molink_start_layer: int = 0
    molink_end_layer: int = -1  # exclusive; -1: to the last layer
    molink_initial_peer: str | None = None
    molink_advertise_host: str | None = None
    molink_advertise_port: int | None = None  # None: the gRPC port it binds
    molink_micro_batches: int = 0  # 0: adaptive, from the measured compute and links
    molink_wire_dtype: str = "auto"
    molink_transmission_scheduling: str = "on"
    molink_max_memory: int | None = None  # bytes; None: what the machine has free, less headroom
    # ms one decoder layer takes for a probe step; None: measured at start (molink.stage.speed)
    molink_layer_step_ms: float | None = None
    # Set when neither layer flag was given: the node picks its span from the swarm.
    molink_auto_place: bool = False
    molink_dht: str = "auto"  # announce and discover nodes through the swarm's DHT (above)
    molink_dht_ttl: float = 15.0  # seconds a DHT record lives without renewal
    # head: how long requests whose node was lost wait for another to take its layers
    molink_failover_timeout: float = 30.0
    # stage: a head's sequences are freed when the head has been silent this long
    molink_lease_timeout: float = 10.0
    molink_swarm_key: str | None = field(default=None, repr=False)
    molink_swarm_key_file: str | None = None
    molink_verify_fraction: float = (
        0.0  # spot checks at the head (molink.pipeline.head_spot_checks)
    )
    allowed_origins: tuple[str, ...] = ()  # CORS; none: no cross-origin access
    allow_credentials: bool = False
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    ssl_ca_certs: str | None = None  # clients' CA (mutual TLS)
    ssl_cert_reqs: int = 0  # ssl.CERT_NONE; 1 optional, 2 required
    # vLLM's serving flags, so that a vLLM command line starts this server unchanged.
    enable_prefix_caching: bool = ENGINE_DEFAULTS.enable_prefix_caching
    chat_template: str | None = None  # a file, or the template text itself
    trust_request_chat_template: bool = False
    generation_config: str = "auto"  # "auto": the model's sampling defaults; "vllm": none
    override_generation_config: str | None = None  # JSON object laid over generation_config
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False
    gpu_memory_utilization: float = ENGINE_DEFAULTS.gpu_memory_utilization
    enforce_eager: bool = False
    trust_remote_code: bool = False
    disable_log_requests: bool = False
    disable_log_stats: bool = False
    disable_frontend_multiprocessing: bool = False
    enable_chunked_prefill: bool | None = None
    swap_space: float | None = None
    uvicorn_log_level: str | None = None
    # Where the model and tokenizer come from (molink.cli.vllm_loading_args).
    tokenizer: str | None = None  # a folder holding tokenizer.json; None: the model's
    revision: str | None = None
    tokenizer_revision: str | None = None
    tokenizer_mode: str = "auto"
    download_dir: str | None = None
    load_format: str = "auto"
    # The HTTP API (molink.cli.vllm_api_args).
    max_logprobs: int = DEFAULT_MAX_LOGPROBS
    reasoning_parser: str | None = None  # molink.api.reasoning
    return_tokens_as_token_ids: bool = False
    chat_template_content_format: str = "auto"
    disable_fastapi_docs: bool = False
    enable_request_id_headers: bool = False
    enable_force_include_usage: bool = False
    # vLLM flags for features this server lacks: (flag, value) of those given
    # (molink.cli.vllm_compat_flags: accepted with a note, or refused).
    compat_flags: tuple[tuple[str, str], ...] = ()
    root_path: str | None = None
    response_role: str = "assistant"
    guided_decoding_backend: str = "auto"
    structured_outputs_config: str | None = None
    max_seq_len_to_capture: int | None = None
    enable_log_requests: bool = False
    disable_uvicorn_access_log: bool = False
    pipeline_parallel_size: int = 1

    def __post_init__(self) -> None:
        if self.dtype in DTYPE_ALIASES:
            object.__setattr__(self, "dtype", DTYPE_ALIASES[self.dtype])
        object.__setattr__(self, "kv_cache_dtype", kv_cache_dtype_name(self.kv_cache_dtype))
        if self.quantization in QUANTIZATION_ALIASES:
            object.__setattr__(self, "quantization", QUANTIZATION_ALIASES[self.quantization])
        self.validate()

    @property
    def model_name(self) -> str:
        """The name clients send as "model"."""
        if self.served_model_name:
            return self.served_model_name
        return self.model or DEFAULT_MODEL_NAME

    def resolved_model(self) -> str:
        """A path or hub id to load: the given --model, or the embedded default model."""
        if self.model is not None:
            return self.model
        path = embedded_model_path()
        if path is None:
            raise InvalidParameterError(
                "model",
                f"no --model given and the default model ({DEFAULT_MODEL_NAME}, package "
                f"{EMBEDDED_MODEL_PACKAGE}) is not installed",
            )
        return path

    def validate(self) -> None:
        check_choice(self.dtype, DTYPE_CHOICES, "dtype")
        check_device_text(self.device)
        check_quantization_choice(self.quantization)
        check_batch_kernel(self.quantized_batch_kernel)
        validate_loading_flags(self)  # before the dtype check: it names fp8_e5m2 itself
        check_kv_cache_dtype(self.kv_cache_dtype)
        validate_pipeline_settings(self)
        check_choice(self.log_level, LOG_LEVEL_CHOICES, "log_level")
        check_port(self.port, "port")
        check_port(self.molink_grpc_port, "molink_grpc_port")
        if self.molink_advertise_port is not None:
            check_port(self.molink_advertise_port, "molink_advertise_port")
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "tensor_parallel_size",
        ):
            check_positive(getattr(self, name), name)
        for name in ("max_model_len", "kv_cache_memory", "num_threads"):
            if getattr(self, name) is not None:
                check_positive(getattr(self, name), name)
        if self.max_num_batched_tokens < self.max_num_seqs:
            # vLLM refuses this at startup too: a step could not fit a token of every
            # running sequence.
            raise InvalidParameterError(
                "max_num_batched_tokens",
                f"--max-num-batched-tokens {self.max_num_batched_tokens} is smaller than "
                f"--max-num-seqs {self.max_num_seqs}; it must be at least as large, so that "
                "every running sequence can take a step (raise the first or lower the second)",
            )
        self._validate_vllm_flags()
        validate_pipeline_layout(self)
        validate_security_args(self)

    def _validate_vllm_flags(self) -> None:
        validate_vllm_flags(self)
        validate_api_flags(self)
        validate_compat_flags(self.compat_flags)

    def ignored_flags(self) -> list[str]:
        """What each vLLM flag given here that means nothing on this server is, one line each."""
        return [
            *ignored_vllm_flags(self),
            *ignored_loading_flags(self),
            *ignored_api_flags(self),
            *compat_notes(self.compat_flags),
        ]

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> EngineArgs:
        values = {
            f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)
        }
        values["compat_flags"] = compat_values(namespace)
        names = values.get("served_model_name")
        if isinstance(names, list):  # --served-model-name takes one or more names
            values["served_model_name"] = names[0]
            values["served_model_aliases"] = tuple(names[1:])
        if values.get("api_key") is None:
            values["api_key"] = (
                os.environ.get(API_KEY_ENV) or os.environ.get(VLLM_API_KEY_ENV) or None
            )
        start, end = values.get("molink_start_layer"), values.get("molink_end_layer")
        values["molink_auto_place"] = start is None and end is None
        values["molink_start_layer"] = 0 if start is None else start
        values["molink_end_layer"] = -1 if end is None else end
        return cls(**values)


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds every serving flag, with its default shown in --help."""
    add_serving_args(parser)
    add_cors_args(parser)
    add_vllm_args(parser)
    add_pipeline_args(parser)
    add_security_args(parser)
    return parser
