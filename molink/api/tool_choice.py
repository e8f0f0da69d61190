"""``tools`` + ``tool_choice`` of a chat request: what constrains the output and how the
reply is read back.

* ``none`` (or no tools): plain text.
* ``auto``: needs ``--enable-auto-tool-choice`` and a ``--tool-call-parser``; the model
  answers in text or calls tools in the parser's format (each opened call is held to a
  declared function and its schema by a grammar).
* ``required``: the reply is a JSON array of ``{"name", "parameters"}`` calls, at least
  one, each matching its function's schema (as vLLM does).
* a named function: the reply is that function's arguments, matching its schema.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from molink.api.context import ServerContext
from molink.api.errors import APIError
from molink.api.schemas import ChatCompletionRequest, Tool
from molink.api.tool_parsers import ParsedToolCall, ToolParser, parameters_schema, tool_parser
from molink.sampling_params import StructuredOutputSpec


@dataclass(frozen=True)
class ToolPlan:
    mode: str  # "none" | "auto" | "required" | "named"
    constraint: StructuredOutputSpec | None = None
    parser: ToolParser | None = None  # auto only
    function_name: str | None = None  # named only
    # parallel_tool_calls false: at most one call. The auto grammar lets the model open
    # several, so only the first is kept (as vLLM does); required's schema allows just one.
    single: bool = False

    def read(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, tool calls) of a finished reply."""
        if self.mode == "named":
            return None, [ParsedToolCall(self.function_name or "", text)]
        if self.mode == "required":
            calls = _required_calls(text)[: 1 if self.single else None]
            # No complete call (cut by max_tokens): the text is the content, as a stream
            # sends it.
            return (None if calls else text), calls
        if self.mode == "auto" and self.parser is not None:
            content, calls = self.parser.parse(text)
            return content, calls[: 1 if self.single else None]
        return text, []


NO_TOOLS = ToolPlan("none")


def plan_tools(ctx: ServerContext, body: ChatCompletionRequest) -> ToolPlan:
    choice = body.tool_choice
    tools = body.tools or []
    if not tools:
        if choice not in (None, "none"):
            raise APIError(400, "tool_choice needs tools", "tool_choice")
        return NO_TOOLS
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise APIError(400, "tool function names must be unique", "tools")
    if any(t.type != "function" for t in tools):
        raise APIError(400, "only tools of type 'function' are supported", "tools")
    if choice == "none":
        return NO_TOOLS
    single = body.parallel_tool_calls is False
    if choice is None or choice == "auto":
        return _auto(ctx, tools, single)
    if choice == "required":
        schema = _array(tools, single)
        return ToolPlan("required", StructuredOutputSpec("json", json.dumps(schema)), single=single)
    if isinstance(choice, str):
        raise APIError(
            400, "tool_choice must be none, auto, required or a named function", "tool_choice"
        )
    name = choice.function.get("name")
    tool = next((t for t in tools if t.function.name == name), None)
    if tool is None:
        raise APIError(400, f"tool_choice names {name!r}, which is not in tools", "tool_choice")
    schema = json.dumps(parameters_schema(tool))
    return ToolPlan("named", StructuredOutputSpec("json", schema), function_name=name)


def _auto(ctx: ServerContext, tools: list[Tool], single: bool) -> ToolPlan:
    options = ctx.chat
    if not options.enable_auto_tool_choice or options.tool_call_parser is None:
        raise APIError(
            400,
            'tool_choice "auto" needs the server started with --enable-auto-tool-choice '
            "and --tool-call-parser",
            "tool_choice",
        )
    parser = tool_parser(options.tool_call_parser)
    grammar = StructuredOutputSpec("grammar", parser.auto_grammar(tools))
    return ToolPlan("auto", grammar, parser, single=single)


def _array(tools: list[Tool], single: bool) -> dict[str, Any]:
    """An array of calls; with parallel_tool_calls false, exactly one."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": t.function.name},
                "parameters": parameters_schema(t),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if single:
        schema["maxItems"] = 1
    return schema


def _required_calls(text: str) -> list[ParsedToolCall]:
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []  # cut by max_tokens: no complete call to report
    return [
        ParsedToolCall(item["name"], json.dumps(item.get("parameters", {}), ensure_ascii=False))
        for item in items
        if isinstance(item, dict) and isinstance(item.get("name"), str)
    ]
