"""--chat-template-content-format: message content reaches the template as a string or as
OpenAI's list of parts, as vLLM passes it; auto looks at whether the template loops over
the content."""

from __future__ import annotations

import argparse
from types import SimpleNamespace

import pytest

from molink.api.chat_render import content_format_of, render_chat_text, to_template_messages
from molink.api.context import ChatOptions
from molink.api.schemas import ChatCompletionRequest, ChatMessage
from molink.cli.args import EngineArgs, add_engine_args
from molink.cli.serve import chat_options
from molink.tokenizer.tokenizer import Tokenizer

# Gemma 3's way: a string, or a loop over the parts.
LOOPING = (
    "{%- for message in messages -%}<{{ message['role'] }}>"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}</s>{%- endfor -%}"
)
PLAIN = "{% for message in messages %}<{{ message.role }}>{{ message.content }}</s>{% endfor %}"
PARTS = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        (LOOPING, "openai"),
        ("{% for c in message.content | selectattr('type', 'equalto', 'text') %}", "openai"),
        ("{% for m in messages %}{% for part in m['content'] %}{% endfor %}{% endfor %}",
         "openai"),
        (PLAIN, "string"),
        (None, "string"),
    ],
)  # fmt: skip
def test_auto_detects_a_loop_over_the_content(template: str | None, expected: str) -> None:
    assert content_format_of("auto", template) == expected
    assert content_format_of("string", LOOPING) == "string"
    assert content_format_of("openai", PLAIN) == "openai"


def test_the_openai_format_passes_parts() -> None:
    messages = [
        ChatMessage(role="user", content="Hi"),
        ChatMessage(role="user", content=PARTS),
        ChatMessage(role="assistant", content=None),
    ]
    converted = to_template_messages(messages, "openai")
    assert [m["content"] for m in converted] == [
        [{"type": "text", "text": "Hi"}],
        PARTS,
        [],
    ]
    assert [m["content"] for m in to_template_messages(messages)] == ["Hi", "one\ntwo", ""]


def render(tokenizer: Tokenizer, content_format: str, template: str) -> str:
    ctx = SimpleNamespace(
        engine=SimpleNamespace(tokenizer=tokenizer),
        chat=ChatOptions(chat_template=template, chat_template_content_format=content_format),
    )
    body = ChatCompletionRequest(messages=[{"role": "user", "content": PARTS}])
    return render_chat_text(ctx, body.messages, body)


def test_a_looping_template_gets_the_parts(tiny_model_dir) -> None:
    tokenizer = Tokenizer.from_dir(tiny_model_dir("llama"))
    assert render(tokenizer, "auto", LOOPING) == "<user>onetwo</s>"  # as vLLM renders it
    assert render(tokenizer, "string", LOOPING) == "<user>one\ntwo</s>"
    assert render(tokenizer, "auto", PLAIN) == "<user>one\ntwo</s>"


def test_the_flag_reaches_the_chat_options() -> None:
    parser = add_engine_args(argparse.ArgumentParser())
    args = EngineArgs.from_namespace(
        parser.parse_args(["--chat-template-content-format", "openai"])
    )
    assert chat_options(args, None, {}).chat_template_content_format == "openai"
    with pytest.raises(SystemExit):
        parser.parse_args(["--chat-template-content-format", "xml"])
