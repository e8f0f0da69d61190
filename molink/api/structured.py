"""What a request asks its output to follow: OpenAI's ``response_format`` or vLLM's
``structured_outputs`` (and its older ``guided_*`` fields), as one grammar spec.

Specs are checked here, on the head, so that a malformed schema or regex is a 400 naming
the field before anything is scheduled; the last stage compiles and caches the grammar.
"""

from __future__ import annotations

import json
from typing import Any

from molink.api.errors import APIError
from molink.api.schemas import SamplingFields
from molink.api.structural_tag import json_object, structural_tag_spec
from molink.api.structured_options import (
    apply_structured_options,
    check_structured_options,
    with_whitespace_pattern,
)
from molink.errors import InvalidParameterError
from molink.sampling.structured import to_llguidance_grammar
from molink.sampling_params import StructuredOutputSpec

ANY_JSON_OBJECT = '{"type": "object"}'


def structured_spec(body: SamplingFields) -> StructuredOutputSpec | None:
    """At most one source may be given; None for unconstrained output."""
    found = [
        (field, spec)
        for field, spec in (
            _from_response_format(body),
            _from_structured_outputs(body),
            ("guided_json", _json_spec(body.guided_json, "guided_json")),
            ("guided_regex", _simple("regex", body.guided_regex)),
            ("guided_choice", _choice(body.guided_choice, "guided_choice")),
            ("guided_grammar", _simple("grammar", body.guided_grammar)),
        )
        if spec is not None
    ]
    if not found:
        if body.guided_whitespace_pattern is not None:
            raise APIError(
                400,
                "guided_whitespace_pattern needs a JSON schema constraint",
                "guided_whitespace_pattern",
            )
        return None
    if len(found) > 1:
        names = ", ".join(_source(field) for field, _ in found)
        raise APIError(
            400, f"only one output constraint may be given, got {names}", _source(found[0][0])
        )
    field, spec = found[0]
    spec = with_whitespace_pattern(
        spec, body.guided_whitespace_pattern, "guided_whitespace_pattern"
    )
    check_spec(spec, field)  # named by the sub-field that holds it
    return spec


def _source(field: str) -> str:
    """The request field a constraint came from (structured_outputs.regex: structured_outputs)."""
    return field.split(".", 1)[0]


def check_spec(spec: StructuredOutputSpec, field: str) -> None:
    try:
        to_llguidance_grammar(spec, field)
    except InvalidParameterError as exc:
        raise APIError(400, str(exc), field) from exc


def json_schema_spec(schema: dict[str, Any]) -> StructuredOutputSpec:
    return StructuredOutputSpec("json", json.dumps(schema, ensure_ascii=False))


def _from_response_format(body: SamplingFields) -> tuple[str, StructuredOutputSpec | None]:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return "response_format", None
    if fmt.type == "json_object":
        return "response_format", StructuredOutputSpec("json", ANY_JSON_OBJECT)
    if fmt.type == "json_schema":
        field = "response_format.json_schema.schema"
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "json_schema.schema is required", field)
        return field, json_schema_spec(fmt.json_schema.schema_)
    if fmt.type == "structural_tag":
        field = "response_format"
        return field, structural_tag_spec(dict(fmt.model_extra or {}), field)
    raise APIError(
        400,
        f"response_format type {fmt.type!r} is not one of text, json_object, json_schema, "
        "structural_tag",
        "response_format.type",
    )


def _from_structured_outputs(body: SamplingFields) -> tuple[str, StructuredOutputSpec | None]:
    so = body.structured_outputs
    if so is None:
        return "structured_outputs", None
    check_structured_options(so)
    specs = [
        (f"structured_outputs.{name}", spec)
        for name, spec in (
            ("json", _json_spec(so.json_, "structured_outputs.json")),
            ("regex", _simple("regex", so.regex)),
            ("choice", _choice(so.choice, "structured_outputs.choice")),
            ("grammar", _simple("grammar", so.grammar)),
            (
                "json_object",
                StructuredOutputSpec("json", ANY_JSON_OBJECT) if so.json_object else None,
            ),
            (
                "structural_tag",
                structural_tag_spec(so.structural_tag, "structured_outputs.structural_tag"),
            ),
        )
        if spec is not None
    ]
    if len(specs) != 1:
        raise APIError(
            400,
            "structured_outputs takes exactly one of json, regex, choice, grammar, "
            "json_object, structural_tag",
            "structured_outputs",
        )
    field, spec = specs[0]
    return field, apply_structured_options(so, spec)


def _json_spec(value: dict[str, Any] | str | None, field: str) -> StructuredOutputSpec | None:
    if value is None:
        return None
    return json_schema_spec(json_object(value, field, "a JSON schema must be an object"))


def _simple(kind: str, value: str | None) -> StructuredOutputSpec | None:
    return None if value is None else StructuredOutputSpec(kind, value)


def _choice(value: list[str] | None, field: str) -> StructuredOutputSpec | None:
    if value is None:
        return None
    if not value:
        raise APIError(400, f"{field}: must list at least one string", field)
    return StructuredOutputSpec("choice", json.dumps(value, ensure_ascii=False))
