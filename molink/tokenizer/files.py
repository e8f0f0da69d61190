"""Reading a Hugging Face tokenizer directory's configuration files (JSON and Jinja only).

Everything here is data: nothing read from the directory is executed. The chat template is
only rendered later, inside a sandbox.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from molink.errors import MolinkError

logger = logging.getLogger(__name__)

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
GENERATION_CONFIG_FILE = "generation_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_JSON_FILE = "chat_template.json"
EXTRA_CHAT_TEMPLATES_DIR = "additional_chat_templates"

# The named special tokens, in the order transformers registers them.
NAMED_SPECIAL_TOKENS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class TokenizerLoadError(MolinkError):
    """A tokenizer directory is missing a file or holds one that cannot be parsed."""


@dataclass(frozen=True)
class TokenSpec:
    """An added token as the config files describe it (transformers' AddedToken fields)."""

    content: str
    special: bool = True
    lstrip: bool = False
    rstrip: bool = False
    normalized: bool = False
    single_word: bool = False


@dataclass
class TokenizerFiles:
    """What the configuration files of a tokenizer directory say, beyond tokenizer.json."""

    directory: Path
    named_tokens: dict[str, TokenSpec] = field(default_factory=dict)  # bos_token, eos_token...
    extra_special_tokens: list[TokenSpec] = field(default_factory=list)
    added_tokens: dict[int, TokenSpec] = field(default_factory=dict)  # added_tokens_decoder
    chat_template: str | dict[str, str] | None = None
    clean_up_tokenization_spaces: bool = False
    generation_eos_token_ids: tuple[int, ...] = ()


def read_tokenizer_files(directory: Path) -> TokenizerFiles:
    if not (directory / TOKENIZER_FILE).is_file():
        raise TokenizerLoadError(f"{directory} has no {TOKENIZER_FILE}")
    config = _read_json(directory / TOKENIZER_CONFIG_FILE) or {}
    special_map = _read_json(directory / SPECIAL_TOKENS_MAP_FILE) or {}
    files = TokenizerFiles(directory=directory)
    files.named_tokens = _named_tokens(config, special_map)
    files.extra_special_tokens, model_tokens = _extra_special_tokens(config, special_map)
    files.named_tokens.update(model_tokens)
    files.added_tokens = _added_tokens(config.get("added_tokens_decoder"))
    files.chat_template = _chat_template(directory, config)
    files.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
    generation = _read_json(directory / GENERATION_CONFIG_FILE) or {}
    files.generation_eos_token_ids = _token_id_list(generation.get("eos_token_id"))
    return files


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise TokenizerLoadError(f"cannot parse {path}: {error}") from error
    if not isinstance(data, dict):
        raise TokenizerLoadError(f"{path} must hold a JSON object")
    return data


def token_spec(value: Any, special: bool = True) -> TokenSpec | None:
    """A token given as a string or as a serialised AddedToken dict; None when absent."""
    if value is None:
        return None
    if isinstance(value, str):
        return TokenSpec(content=value, special=special)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return TokenSpec(
            content=value["content"],
            special=bool(value.get("special", special)),
            lstrip=bool(value.get("lstrip", False)),
            rstrip=bool(value.get("rstrip", False)),
            normalized=bool(value.get("normalized", False)),
            single_word=bool(value.get("single_word", False)),
        )
    raise TokenizerLoadError(f"cannot read a token from {value!r}")


def _named_tokens(config: dict[str, Any], special_map: dict[str, Any]) -> dict[str, TokenSpec]:
    """Named special tokens from tokenizer_config.json; special_tokens_map.json overrides them
    when the config has no added_tokens_decoder (transformers' rule for older directories)."""
    use_map = "added_tokens_decoder" not in config
    named: dict[str, TokenSpec] = {}
    for name in NAMED_SPECIAL_TOKENS:
        value = config.get(name)
        if use_map and special_map.get(name) is not None:
            value = special_map[name]
        spec = token_spec(value)
        if spec is not None:
            named[name] = spec
    return named


def _extra_special_tokens(
    config: dict[str, Any], special_map: dict[str, Any]
) -> tuple[list[TokenSpec], dict[str, TokenSpec]]:
    """Extra special tokens: lists of tokens, or a dict of model-specific named tokens.

    special_tokens_map.json adds to them when the config has no added_tokens_decoder.
    """
    values = [_extra_value(config)]
    if "added_tokens_decoder" not in config:
        values.append(_extra_value(special_map))
    tokens: list[TokenSpec] = []
    named: dict[str, TokenSpec] = {}
    for value in values:
        if isinstance(value, dict):
            for name, token in value.items():
                spec = token_spec(token)
                if spec is not None:
                    named[str(name)] = spec
                    tokens.append(spec)
        elif isinstance(value, list):
            tokens.extend(spec for spec in map(token_spec, value) if spec is not None)
    unique = list({spec.content: spec for spec in reversed(tokens)}.values())[::-1]
    return unique, named


def _extra_value(source: dict[str, Any]) -> Any:
    value = source.get("extra_special_tokens")
    return value if value else source.get("additional_special_tokens")


def _added_tokens(value: Any) -> dict[int, TokenSpec]:
    if not isinstance(value, dict):
        return {}
    added: dict[int, TokenSpec] = {}
    for key, token in value.items():
        spec = token_spec(token, special=False)
        if spec is None:
            continue
        try:
            added[int(key)] = spec
        except ValueError as error:
            raise TokenizerLoadError(f"added_tokens_decoder key {key!r} is not an id") from error
    return added


def _chat_template(directory: Path, config: dict[str, Any]) -> str | dict[str, str] | None:
    """Template files take priority over the config's entry, as in transformers."""
    templates: dict[str, str] = {}
    default_file = directory / CHAT_TEMPLATE_FILE
    if default_file.is_file():
        templates["default"] = default_file.read_text(encoding="utf-8")
    extra_dir = directory / EXTRA_CHAT_TEMPLATES_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = path.read_text(encoding="utf-8")
    if templates:
        return templates["default"] if list(templates) == ["default"] else templates
    value = config.get("chat_template")
    if value is None:
        value = (_read_json(directory / CHAT_TEMPLATE_JSON_FILE) or {}).get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        try:
            return {str(item["name"]): str(item["template"]) for item in value}
        except (KeyError, TypeError) as error:
            raise TokenizerLoadError("chat_template list entries need name and template") from error
    raise TokenizerLoadError(f"chat_template has an unexpected type {type(value).__name__}")


def _token_id_list(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise TokenizerLoadError(f"eos_token_id must be an id or a list of ids, got {value!r}")
    return tuple(values)
