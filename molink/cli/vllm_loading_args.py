"""vLLM's flags about where the model and its tokenizer come from (--tokenizer, --revision,
--tokenizer-revision, --tokenizer-mode, --download-dir, --load-format) and its fp8 KV-cache
spellings.

Each is honoured where it means something here, accepted with a note where it cannot change
anything (a revision of a local folder), and refused naming the value where accepting it
would load or compute something other than what was asked for.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Protocol

from molink.errors import InvalidParameterError

# vLLM's spellings of the fp8 KV cache: fp8 is e4m3 on CUDA, which is what the cache here
# stores (float8_e4m3fn); e5m2 is another format, which it does not.
KV_CACHE_DTYPE_ALIASES = {"fp8_e4m3": "fp8"}
REFUSED_KV_CACHE_DTYPES = ("fp8_e5m2",)
# vLLM's Marlin kernels run the same AWQ/GPTQ checkpoints; here they take this server's.
QUANTIZATION_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}
TOKENIZER_MODES = ("auto", "hf", "slow", "mistral", "custom")
# Modes that load tokenizer.json with the fast (Rust) tokenizers library, as this server does.
_FAST_TOKENIZER_MODES = ("auto", "hf")
LOAD_FORMATS = (
    "auto",
    "safetensors",
    "gguf",
    "pt",
    "npcache",
    "dummy",
    "tensorizer",
    "sharded_state",
    "bitsandbytes",
    "mistral",
    "runai_streamer",
    "runai_streamer_sharded",
    "fastsafetensors",
)


class LoadingArgs(Protocol):
    model: str | None
    kv_cache_dtype: str
    tokenizer: str | None
    revision: str | None
    tokenizer_revision: str | None
    tokenizer_mode: str
    download_dir: str | None
    load_format: str
    tensor_parallel_size: int


def kv_cache_dtype_name(value: str) -> str:
    """vLLM's fp8_e4m3 is this server's fp8."""
    return KV_CACHE_DTYPE_ALIASES.get(value, value)


def validate_loading_flags(args: LoadingArgs) -> None:
    if args.kv_cache_dtype in REFUSED_KV_CACHE_DTYPES:
        raise InvalidParameterError(
            "kv_cache_dtype",
            f"{args.kv_cache_dtype} is not supported: the fp8 KV cache holds float8_e4m3fn "
            "values; use --kv-cache-dtype fp8 (or fp8_e4m3), or auto, float32, bfloat16",
        )
    if args.tokenizer is not None and not (Path(args.tokenizer) / "tokenizer.json").is_file():
        raise InvalidParameterError(
            "tokenizer",
            f"{args.tokenizer} is not a folder holding tokenizer.json (a tokenizer is loaded "
            "from a local folder, not from the hub)",
        )
    if args.tokenizer_mode not in _FAST_TOKENIZER_MODES:
        raise InvalidParameterError(
            "tokenizer_mode",
            f"{args.tokenizer_mode!r} is not supported: the tokenizer is always the model's "
            f"tokenizer.json (modes {', '.join(_FAST_TOKENIZER_MODES)})",
        )
    _validate_load_format(args)
    hub = _is_hub_model(args.model)
    if args.download_dir is not None and hub:
        raise InvalidParameterError(
            "download_dir",
            "hub models are read from the Hugging Face cache; set HF_HUB_CACHE to "
            f"{args.download_dir} instead",
        )
    if args.revision is not None and hub and args.tensor_parallel_size > 1:
        # The other ranks load the model by name, at its default revision.
        raise InvalidParameterError(
            "revision",
            "a hub revision cannot be combined with --tensor-parallel-size above 1; "
            "download that revision and pass its folder as --model",
        )
    if args.tokenizer_revision is not None and hub and args.tokenizer is None:
        # The tokenizer comes with the model's files, so from --revision.
        if args.tokenizer_revision != args.revision:
            raise InvalidParameterError(
                "tokenizer_revision",
                f"{args.tokenizer_revision} differs from --revision {args.revision}: the "
                "tokenizer is read from the model's own files, at --revision",
            )


def _validate_load_format(args: LoadingArgs) -> None:
    fmt = args.load_format
    gguf = args.model is not None and args.model.lower().endswith(".gguf")
    if fmt == "auto" or (fmt == "gguf" and gguf) or (fmt == "safetensors" and not gguf):
        return
    if fmt in ("gguf", "safetensors"):
        raise InvalidParameterError("load_format", f"{fmt} does not match the model {args.model}")
    raise InvalidParameterError(
        "load_format",
        f"{fmt!r} is not supported: weights load from safetensors or GGUF files only "
        "(auto, safetensors, gguf); pickled (.bin/pt) weights are never loaded",
    )


def _is_hub_model(model: str | None) -> bool:
    if model is None:
        return False
    path = Path(model).expanduser()
    return not path.exists()


def ignored_loading_flags(args: LoadingArgs) -> list[str]:
    notes = []
    local = not _is_hub_model(args.model)
    if args.revision is not None and local:
        notes.append("--revision: the model is a local path; no revision is chosen")
    if args.tokenizer_revision is not None and (local or args.tokenizer is not None):
        notes.append("--tokenizer-revision: the tokenizer is a local folder")
    if args.download_dir is not None:
        notes.append("--download-dir: the model is a local path; nothing is downloaded")
    return notes


def add_loading_args(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--tokenizer",
        default=None,
        metavar="FOLDER",
        help="folder holding the tokenizer.json (and chat template) to use instead of the "
        "model's (default: the model's)",
    )
    group.add_argument(
        "--revision",
        default=None,
        help="branch, tag or commit of a hub model; no effect on a local path (default: main)",
    )
    group.add_argument(
        "--tokenizer-revision",
        default=None,
        help="the tokenizer's revision: a hub model's tokenizer comes with its files, at "
        "--revision, so only that one is accepted (default: --revision)",
    )
    group.add_argument(
        "--tokenizer-mode",
        default="auto",
        choices=TOKENIZER_MODES,
        help="auto/hf: the model's tokenizer.json (fast tokenizer); slow, mistral and custom "
        "tokenizers are refused (default: %(default)s)",
    )
    group.add_argument(
        "--download-dir",
        default=None,
        help="no effect on a local model; a hub model is read from the Hugging Face cache "
        "(set HF_HUB_CACHE) (default: none)",
    )
    group.add_argument(
        "--load-format",
        default="auto",
        choices=LOAD_FORMATS,
        help="auto, safetensors or gguf, as the model is; other formats are refused "
        "(default: %(default)s)",
    )
