"""The tool-call formats of --tool-call-parser, and what a stream holds back."""

from __future__ import annotations

import json

from molink.api.schemas import Tool
from molink.api.tool_parsers import HermesToolParser, Llama3JsonToolParser
from molink.sampling.structured import to_llguidance_grammar
from molink.sampling_params import StructuredOutputSpec

TOOL = Tool.model_validate(
    {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
)


def test_hermes_blocks_after_text() -> None:
    text = (
        'Let me add.<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
        '<tool_call>{"name": "add", "arguments": {"a": 2}}</tool_call>'
    )
    content, calls = HermesToolParser().parse(text)
    assert content == "Let me add."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("add", {"a": 1}),
        ("add", {"a": 2}),
    ]


def test_hermes_without_a_well_formed_call_is_content() -> None:
    assert HermesToolParser().parse("no call") == ("no call", [])
    assert HermesToolParser().parse("<tool_call>{oops</tool_call>")[1] == []


def test_hermes_stream_holds_back_from_a_possible_tag() -> None:
    parser = HermesToolParser()
    assert parser.call_start("Hello") is None
    assert parser.call_start("Hello <tool") == 6
    assert parser.call_start("Hello <b>") is None
    assert parser.call_start("Hi <tool_call>{") == 3


def test_llama3_json_calls() -> None:
    parser = Llama3JsonToolParser()
    text = (
        '<|python_tag|>{"name": "add", "parameters": {"a": 1}}; {"name": "add", "parameters": {}}'
    )
    content, calls = parser.parse(text)
    assert content is None and [c.name for c in calls] == ["add", "add"]
    assert json.loads(calls[0].arguments) == {"a": 1}
    assert parser.parse("The answer is 4.") == ("The answer is 4.", [])
    assert parser.call_start(" {") == 0 and parser.call_start("The") is None


def test_auto_grammars_compile() -> None:
    for parser in (HermesToolParser(), Llama3JsonToolParser()):
        to_llguidance_grammar(StructuredOutputSpec("grammar", parser.auto_grammar([TOOL])))
