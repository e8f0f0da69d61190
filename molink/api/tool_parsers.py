"""Reading the tool calls a model writes, in the formats vLLM's ``--tool-call-parser`` names.

* ``hermes`` (Hermes, Qwen 2/2.5/3): ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  blocks; text before the first block is the message content.
* ``llama3_json`` (Llama 3.1/3.2): the whole reply is one JSON object
  ``{"name": ..., "parameters": {...}}`` (or several separated by ``;``), optionally after
  ``<|python_tag|>``.

Each parser also gives the grammar that, under ``tool_choice: "auto"``, leaves the model free
to answer in text but makes every call it opens name a declared function with arguments
that match its schema (llguidance's lazy structural tags).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any, Protocol

from llguidance._struct_tag import StructTag

from molink.api.schemas import Tool


@dataclass(frozen=True)
class ParsedToolCall:
    name: str
    arguments: str  # JSON text

    def to_openai(self, call_id: str | None = None) -> dict[str, Any]:
        return {
            "id": call_id or new_call_id(),
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolParser(Protocol):
    name: str

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        """(content, calls) of a finished reply; no calls: the text is the content."""

    def call_start(self, text: str) -> int | None:
        """Where in the reply so far a tool call starts or may still start (a stream holds
        the text from there back until the reply ends); None: all of it is content."""

    def auto_grammar(self, tools: list[Tool]) -> str:
        """Lark grammar: free text, but any call the model opens must be valid."""


def parameters_schema(tool: Tool) -> dict[str, Any]:
    return tool.function.parameters or {"type": "object"}


def _call(obj: Any, arguments_key: str) -> ParsedToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    return ParsedToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class HermesToolParser:
    name = "hermes"
    _START = "<tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        start = text.find(self._START)
        if start < 0:
            return text, []
        calls = []
        for block in self._BLOCK.findall(text[start:]):
            try:
                call = _call(json.loads(block), "arguments")
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []  # not a well-formed call: leave the text as it is
            calls.append(call)
        # The text before the first call as written, unstripped, as vLLM's hermes parser
        # gives it: a stream sends that text as it comes, so the two replies agree.
        return (text[:start] or None), calls

    def call_start(self, text: str) -> int | None:
        start = text.find(self._START)
        if start >= 0:
            return start
        last = text.rfind("<")
        if last >= 0 and self._START.startswith(text[last:]):
            return last
        return None

    def auto_grammar(self, tools: list[Tool]) -> str:
        tags = [
            StructTag(
                trigger=self._START,
                begin=f'{self._START}\n{{"name": {json.dumps(t.function.name)}, "arguments": ',
                grammar=parameters_schema(t),
                end="}\n</tool_call>",
            )
            for t in tools
        ]
        return StructTag.to_grammar(tags, assume_special=False)


class Llama3JsonToolParser:
    name = "llama3_json"
    _TAG = "<|python_tag|>"

    def parse(self, text: str) -> tuple[str | None, list[ParsedToolCall]]:
        body = text.strip()
        if body.startswith(self._TAG):
            body = body[len(self._TAG) :].strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        decoder = json.JSONDecoder()
        position = 0
        while position < len(body):
            try:
                obj, end = decoder.raw_decode(body, position)
            except json.JSONDecodeError:
                return text, []
            call = _call(obj, "parameters")
            if call is None:
                return text, []
            calls.append(call)
            position = end
            while position < len(body) and body[position] in " \n\t;":
                position += 1
        return None, calls

    def call_start(self, text: str) -> int | None:
        body = text.lstrip()
        if not body or body.startswith(("{", self._TAG)) or self._TAG.startswith(body):
            return 0
        return None

    def auto_grammar(self, tools: list[Tool]) -> str:
        tags = [
            StructTag(
                trigger='{"name": ',
                begin=f'{{"name": {json.dumps(t.function.name)}, "parameters": ',
                grammar=parameters_schema(t),
                end="}",
            )
            for t in tools
        ]
        return StructTag.to_grammar(tags, assume_special=False)


PARSERS: dict[str, type] = {"hermes": HermesToolParser, "llama3_json": Llama3JsonToolParser}


def tool_parser(name: str) -> ToolParser:
    return PARSERS[name]()
