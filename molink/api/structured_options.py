"""vLLM's ``structured_outputs`` options beside the constraint itself, as llguidance takes
them: JSON whitespace (``disable_any_whitespace``, ``whitespace_pattern``) through the
schema's ``x-guidance`` object, ``disable_additional_properties`` by closing every object
that does not say otherwise. Unknown options are a 400 naming them.
"""

from __future__ import annotations

import json
from typing import Any

from molink.api.errors import APIError
from molink.api.schemas import StructuredOutputs
from molink.sampling_params import StructuredOutputSpec

# Options that shape a JSON grammar only; with regex, choice or grammar they are refused.
_JSON_ONLY = ("whitespace_pattern", "disable_additional_properties")
# Keys whose values are objects of schemas, and keys whose values are schema lists.
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_VALUES = ("items", "additionalItems", "not", "if", "then", "else", "contains")


def check_structured_options(so: StructuredOutputs) -> None:
    """Refuses options no grammar here knows."""
    for name in so.model_extra or {}:
        raise APIError(
            400,
            f"structured_outputs.{name} is not a structured output option",
            f"structured_outputs.{name}",
        )


def apply_structured_options(
    so: StructuredOutputs, spec: StructuredOutputSpec
) -> StructuredOutputSpec:
    """The spec with the options laid over it (json specs); others must not ask for any."""
    if spec.kind != "json":
        for name in _JSON_ONLY:
            if getattr(so, name) not in (None, False):
                raise APIError(
                    400,
                    f"structured_outputs.{name} applies to json and json_object only",
                    f"structured_outputs.{name}",
                )
        return spec
    schema = json.loads(spec.spec)
    guidance: dict[str, Any] = {}
    if so.disable_any_whitespace is not None:
        # False is vLLM's default: whitespace between JSON tokens allowed. Left out, the
        # server's own default holds (compact: molink.sampling.structured).
        guidance["whitespace_flexible"] = not so.disable_any_whitespace
    if so.whitespace_pattern is not None:
        guidance["whitespace_pattern"] = so.whitespace_pattern
    if so.disable_additional_properties:
        schema = _closed(schema)
    return _json_spec(schema, guidance)


def with_whitespace_pattern(
    spec: StructuredOutputSpec, pattern: str | None, field: str
) -> StructuredOutputSpec:
    """vLLM's older ``guided_whitespace_pattern``: the whitespace a JSON grammar allows."""
    if pattern is None:
        return spec
    if spec.kind != "json":
        raise APIError(400, f"{field} applies to a JSON schema constraint only", field)
    return _json_spec(json.loads(spec.spec), {"whitespace_pattern": pattern})


def _json_spec(schema: dict[str, Any], guidance: dict[str, Any]) -> StructuredOutputSpec:
    """A schema's own x-guidance settings win over the request's options."""
    if guidance:
        schema["x-guidance"] = {**guidance, **schema.get("x-guidance", {})}
    return StructuredOutputSpec("json", json.dumps(schema, ensure_ascii=False))


def _closed(schema: Any) -> Any:
    """Every object schema without additionalProperties gets false (vLLM's option)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    is_object = out.get("type") == "object" or "properties" in out
    if is_object and "additionalProperties" not in out:
        out["additionalProperties"] = False
    for key in _SCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(sub) for name, sub in out[key].items()}
    for key in _SCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_closed(sub) for sub in out[key]]
    for key in (*_SCHEMA_VALUES, "additionalProperties"):
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key])
    return out
