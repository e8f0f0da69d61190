"""vLLM's structural tags (``structured_outputs.structural_tag``, ``response_format`` of
type ``structural_tag``): free text, in which each tagged part (``begin``, a value that
follows its JSON schema, ``end``) opens once the text reaches one of the ``triggers``.

They become an llguidance grammar as vLLM's guidance backend builds it; a trigger is
matched as text. xgrammar's newer ``format`` objects are refused naming the field.
"""

from __future__ import annotations

import json
from typing import Any

from llguidance._struct_tag import StructTag

from molink.api.errors import APIError
from molink.sampling_params import StructuredOutputSpec


def structural_tag_spec(
    value: str | dict[str, Any] | None, field: str
) -> StructuredOutputSpec | None:
    if value is None:
        return None
    tag = json_object(value, field)
    structures, triggers = tag.get("structures"), tag.get("triggers")
    if not _strings(triggers) or not isinstance(structures, list) or not structures:
        raise APIError(
            400,
            f"{field}: needs 'structures' (a non-empty list of begin/schema/end objects) and "
            "'triggers' (a non-empty list of strings)",
            field,
        )
    tags = [_struct_tag(item, triggers, field) for item in structures]
    return StructuredOutputSpec("grammar", StructTag.to_grammar(tags, assume_special=False))


def json_object(
    value: str | dict[str, Any], field: str, not_object: str = "must be a JSON object"
) -> dict[str, Any]:
    """A request field's JSON object, given as one or as its JSON text; a 400 naming
    ``field`` otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise APIError(400, f"{field}: not valid JSON: {exc}", field) from None
    if not isinstance(value, dict):
        raise APIError(400, f"{field}: {not_object}", field)
    return value


def _strings(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v for v in value)


def _struct_tag(item: Any, triggers: list[str], field: str) -> StructTag:
    if not (
        isinstance(item, dict)
        and isinstance(item.get("begin"), str)
        and isinstance(item.get("end"), str)
        and isinstance(item.get("schema"), dict)
    ):
        raise APIError(
            400, f"{field}: each structure needs a string begin and end and a schema object", field
        )
    trigger = next((t for t in triggers if item["begin"].startswith(t)), None)
    if trigger is None:
        raise APIError(
            400, f"{field}: begin {item['begin']!r} starts with none of the triggers", field
        )
    return StructTag(trigger=trigger, begin=item["begin"], grammar=item["schema"], end=item["end"])
