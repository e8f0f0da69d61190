"""Phi-3 / Phi-4 and GPT-OSS (harmony) chat templates, as their checkpoints ship them
(tests/fixtures/chat_templates), render through our tokenizer exactly as transformers'
apply_chat_template renders them: from a model directory and from a GGUF file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from molink.tokenizer.chat_template import ChatTemplateError
from molink.tokenizer.tokenizer import Tokenizer
from molink.weights import resolve_model_source
from tests.helpers.tiny_gguf import write_tiny_gguf
from tests.helpers.tiny_models import make_tiny_model, make_tiny_tokenizer

TEMPLATES = Path(__file__).parent.parent / "fixtures" / "chat_templates"
PHI = ("phi-3.5-mini-instruct", "phi-4", "phi-4-mini-instruct")

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "description": "Where"},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"], "default": "celsius"},
                "days": {"type": "integer"},
                "hours": {"type": "array", "items": {"type": "number"}},
                "detail": {"type": "object", "properties": {"wind": {"type": "boolean"}}},
                "note": {"type": "string", "nullable": True},
            },
            "required": ["city"],
        },
    },
}
PLAIN: list[list[dict[str, Any]]] = [
    [{"role": "user", "content": "Hello there!"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "Empty system"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! ünïcode"},
        {"role": "user", "content": "Bye"},
    ],
]
TOOL_TURN = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "reasoning_content": "The user wants the weather; call the tool.",
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny and 21 C in Paris."},
]
HARMONY: list[tuple[list[dict[str, Any]], dict[str, Any]]] = [
    *((messages, {}) for messages in PLAIN),
    ([{"role": "developer", "content": "Answer in French."}, *PLAIN[0]], {}),
    (PLAIN[0], {"reasoning_effort": "high", "model_identity": "You are a test model."}),
    (PLAIN[1], {"builtin_tools": ["browser", "python"]}),
    (PLAIN[1], {"tools": [WEATHER]}),
    (TOOL_TURN, {"tools": [WEATHER]}),
    (TOOL_TURN[:3], {"tools": [WEATHER]}),
    (
        [*PLAIN[0], {"role": "assistant", "thinking": "Greeting back.", "content": "Hi!"}],
        {},
    ),
]


def _template(name: str) -> str:
    return (TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")


def _with_template(path: Path, template: str) -> Path:
    config_path = path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config))
    return path


def _pair(directory: Path) -> tuple[Tokenizer, Any]:
    from transformers import AutoTokenizer

    return Tokenizer.from_dir(directory), AutoTokenizer.from_pretrained(str(directory))


def _same(ours: Tokenizer, theirs: Any, messages: list, **kwargs: Any) -> None:
    for add_generation_prompt in (True, False):
        expected = theirs.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs
        )
        rendered = ours.apply_chat_template(
            messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
        assert rendered == expected


@pytest.mark.parametrize("name", PHI)
def test_phi_templates_render_as_transformers(tmp_path: Path, name: str) -> None:
    ours, theirs = _pair(_with_template(make_tiny_tokenizer(tmp_path), _template(name)))
    for messages in PLAIN:
        _same(ours, theirs, messages)
    tools = json.dumps([WEATHER["function"]])
    _same(ours, theirs, [{**PLAIN[1][0], "tools": tools}, PLAIN[1][1]])


def test_harmony_template_renders_as_transformers(tmp_path: Path) -> None:
    ours, theirs = _pair(_with_template(make_tiny_tokenizer(tmp_path), _template("gpt-oss")))
    for messages, kwargs in HARMONY:
        _same(ours, theirs, messages, **kwargs)
    rendered = ours.apply_chat_template(TOOL_TURN, tools=[WEATHER])
    assert "<|start|>assistant to=functions.get_weather<|channel|>commentary json" in rendered
    assert rendered.endswith("<|start|>assistant")


def test_harmony_template_refusals_are_named(tmp_path: Path) -> None:
    ours, theirs = _pair(_with_template(make_tiny_tokenizer(tmp_path), _template("gpt-oss")))
    orphan_tool = [PLAIN[0][0], {"role": "tool", "content": "x"}]
    with pytest.raises(Exception, match="no previous assistant message with a tool call"):
        theirs.apply_chat_template(orphan_tool, tokenize=False)
    with pytest.raises(ChatTemplateError, match="no previous assistant message with a tool call"):
        ours.apply_chat_template(orphan_tool)


@pytest.mark.parametrize(
    ("arch", "name"), [("phi3", "phi-3.5-mini-instruct"), ("gpt_oss", "gpt-oss")]
)
def test_family_templates_through_a_gguf_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, arch: str, name: str
) -> None:
    monkeypatch.setenv("MOLINK_CACHE_DIR", str(tmp_path / "cache"))
    hf_dir = _with_template(make_tiny_model(arch, tmp_path / "hf"), _template(name))
    source = resolve_model_source(str(write_tiny_gguf(hf_dir, tmp_path / f"{arch}.gguf")))
    ours = Tokenizer.from_dir(source.tokenizer_dir)
    _, theirs = _pair(hf_dir)
    conversations = [(m, {}) for m in PLAIN] if arch == "phi3" else HARMONY
    for messages, kwargs in conversations:
        _same(ours, theirs, messages, **kwargs)
