"""Frozen configuration objects, validated with named errors."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from molink.errors import InvalidParameterError

SUPPORTED_DTYPES = ("auto", "float32", "bfloat16", "float16")
_DTYPE_ALIASES = {
    "half": "float16",
    "fp16": "float16",
    "float": "float32",
    "fp32": "float32",
    "bf16": "bfloat16",
}


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape, read from a Hugging Face config.json (or GGUF metadata)."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float  # the epsilon of the decoder's norms (RMSNorm or LayerNorm)
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # the config's flag; each architecture decides what it means
    rope_scaling: dict[str, Any] | None = None
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str | None = None  # the checkpoint's dtype, for dtype="auto"
    raw: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        archs = cfg.get("architectures") or []
        from molink.models.registry import (
            config_defaults,
            max_positions_default,
            resolve_architecture,
        )

        arch = resolve_architecture(archs)
        cfg = {**config_defaults(arch), **cfg}  # fields the file leaves out, as transformers
        num_heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        eos = cfg.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
        return cls(
            architecture=arch,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            rms_norm_eps=float(
                cfg.get("rms_norm_eps")
                or cfg.get("layer_norm_eps")
                or cfg.get("norm_epsilon")
                or 1e-6
            ),
            rope_theta=_rope_theta(arch, cfg),
            max_position_embeddings=int(
                cfg.get("max_position_embeddings") or max_positions_default(arch)
            ),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            rope_scaling=_rope_scaling(arch, cfg),
            # Qwen configs carry a window they do not use unless use_sliding_window says so.
            sliding_window=(cfg.get("sliding_window") or None)
            if cfg.get("use_sliding_window", True)
            else None,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
            torch_dtype=cfg.get("torch_dtype") or cfg.get("dtype"),
            raw=dict(cfg),
        )


def _rope_theta(arch: str, cfg: dict[str, Any]) -> float:
    """The base a config states, else transformers' default for the family. As transformers
    5 reads it, a base inside rope_parameters or rope_scaling wins over a top-level one."""
    from molink.models.registry import rope_theta_default

    for source in (cfg.get("rope_parameters"), cfg.get("rope_scaling"), cfg):
        if isinstance(source, dict) and source.get("rope_theta"):
            return float(source["rope_theta"])
    return rope_theta_default(arch)


def _rope_scaling(arch: str, cfg: dict[str, Any]) -> dict[str, Any] | None:
    if cfg.get("rope_scaling") or cfg.get("rope_parameters"):
        return cfg.get("rope_scaling") or _rope_params_scaling(cfg)
    from molink.models.registry import rope_scaling_default

    # Null or absent both: transformers applies the family's default (GPT-OSS: YaRN).
    return rope_scaling_default(arch)


def _rope_params_scaling(cfg: dict[str, Any]) -> dict[str, Any] | None:
    """Newer transformers keep scaling under ``rope_parameters``; default rope means none."""
    params = cfg.get("rope_parameters")
    if not params or params.get("rope_type", "default") == "default":
        return None
    return dict(params)


def normalize_dtype(dtype: str) -> str:
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in SUPPORTED_DTYPES:
        raise InvalidParameterError(
            "dtype", f"{dtype!r} is not one of {', '.join(SUPPORTED_DTYPES)}"
        )
    return name


@dataclass(frozen=True)
class LayerRange:
    """Half-open range of decoder layers ``[start, end)`` held by one stage."""

    start: int
    end: int

    def validate(self, num_layers: int) -> None:
        if not 0 <= self.start < self.end <= num_layers:
            raise InvalidParameterError(
                "layer_range",
                f"[{self.start}, {self.end}) must satisfy 0 <= start < end <= {num_layers}",
            )

    @classmethod
    def resolve(cls, start: int, end: int, num_layers: int) -> LayerRange:
        """``end == -1`` means "to the last layer", as on the command line."""
        rng = cls(start, num_layers if end == -1 else end)
        rng.validate(num_layers)
        return rng

    def is_first(self) -> bool:
        return self.start == 0

    def is_last(self, num_layers: int) -> bool:
        return self.end == num_layers


@dataclass(frozen=True)
class EngineDefaults:
    """The one set of engine defaults.

    EngineOptions (molink.engine.factory), EngineArgs and its --help (molink.cli.args) and
    SchedulerConfig all read these, so an offline ``LLM()``, ``molink serve`` and a
    pipeline head behave alike unless told otherwise. Values follow vLLM where it has one.
    """

    dtype: str = "auto"
    device: str = "auto"  # the first CUDA device when torch sees one, else the CPU
    gpu_memory_utilization: float = 0.9  # share of a GPU's memory a stage may use (vLLM's)
    kv_cache_dtype: str = "auto"
    quantized_batch_kernel: str = "int4"  # molink.quant.kernels: weights stay at file size
    block_size: int = 16
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    # What "automatic" KV sizing gives on a CPU: sizing to free memory would take most of a
    # shared machine; this holds ~11k tokens of SmolLM2-135M in float32.
    kv_cache_memory_bytes: int = 512 * 1024 * 1024
    enable_prefix_caching: bool = True
    max_model_len: int = 2048  # only where no model says otherwise (the scheduler alone)


ENGINE_DEFAULTS = EngineDefaults()


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = ENGINE_DEFAULTS.block_size
    num_blocks: int = 0
    enable_prefix_caching: bool = ENGINE_DEFAULTS.enable_prefix_caching


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = ENGINE_DEFAULTS.max_num_batched_tokens  # per micro-batch step
    max_num_seqs: int = ENGINE_DEFAULTS.max_num_seqs  # running sequences, all micro-batches
    max_model_len: int = ENGINE_DEFAULTS.max_model_len
    long_prefill_token_threshold: int = 0  # 0: a prefill may take the whole remaining budget

    def validate(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise InvalidParameterError("max_num_batched_tokens", "must be >= 1")
        if self.max_num_seqs < 1:
            raise InvalidParameterError("max_num_seqs", "must be >= 1")
        if self.max_model_len < 1:
            raise InvalidParameterError("max_model_len", "must be >= 1")
