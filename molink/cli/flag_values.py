"""Parsing and checking single flag values: sizes, HOST:PORT, choices, ports, counts.

Each check raises InvalidParameterError naming the field and what it allows.
"""

from __future__ import annotations

import argparse
import re
from decimal import Decimal

from molink.errors import InvalidParameterError

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


def parse_size(text: str) -> int:
    """Bytes from "512MiB", "1.5GB", "2g" or a plain number of bytes."""
    match = _SIZE_PATTERN.match(text)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise InvalidParameterError(
            "kv_cache_memory", f"{text!r} is not a size such as 512MiB, 2GiB or 1000000"
        )
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def size_arg(text: str) -> int:
    """``parse_size`` as an argparse type (a bad size is a usage error)."""
    try:
        return parse_size(text)
    except InvalidParameterError as exc:
        raise argparse.ArgumentTypeError(exc.message) from exc


_DECIMAL_SUFFIXES = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY_SUFFIXES = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
_TOKEN_COUNT_PATTERN = re.compile(r"(-?\d+)|(\d+(?:\.\d+)?)([kmgt])|(\d+)([KMGT])")


def token_count_arg(text: str) -> int:
    """A token count as vLLM reads it (its human_readable_int): 4096, or with a suffix,
    k/m/g/t decimal (25.6k is 25600) or K/M/G/T binary (32K is 32768, whole numbers only).
    Ranges are checked with the other flags (a negative number is parsed, then refused)."""
    match = _TOKEN_COUNT_PATTERN.fullmatch(text.strip())
    if match is None:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a token count such as 4096, 4k (4000) or 4K (4096)"
        )
    plain, decimal, decimal_suffix, binary, binary_suffix = match.groups()
    if plain is not None:
        return int(plain)
    if decimal is not None:
        return int(Decimal(decimal) * _DECIMAL_SUFFIXES[decimal_suffix])
    return int(binary) * _BINARY_SUFFIXES[binary_suffix]


def max_model_len_arg(text: str) -> int:
    """``token_count_arg`` for --max-model-len, which names vLLM's auto (-1) for what it is."""
    if text.strip() in ("auto", "-1"):
        raise argparse.ArgumentTypeError(
            f"{text!r} (vLLM's: the longest context the memory holds) is not supported: "
            "leave --max-model-len out for the model's own context, or give a length such "
            "as 32k"
        )
    return token_count_arg(text)


def parse_host_port(text: str, field_name: str) -> tuple[str, int]:
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise InvalidParameterError(field_name, f"{text!r} is not HOST:PORT")
    return host, int(port_text)


def check_choice(value: str, choices: tuple[str, ...], name: str) -> None:
    if value not in choices:
        raise InvalidParameterError(name, f"{value!r} is not one of {', '.join(choices)}")


def check_port(value: int, name: str) -> None:
    if not 0 <= value < 65536:
        raise InvalidParameterError(name, f"must be a port number in [0, 65535], got {value}")


def check_positive(value: int, name: str) -> None:
    if value < 1:
        raise InvalidParameterError(name, f"must be >= 1, got {value}")
