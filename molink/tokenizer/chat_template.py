"""Rendering chat templates in a Jinja sandbox, the way transformers' apply_chat_template does.

Templates come from model directories, which may be untrusted, so they run in Jinja's
``ImmutableSandboxedEnvironment`` with only the helpers transformers offers
(``raise_exception``, ``strftime_now``, a ``tojson`` that does not HTML-escape) and with
``dict``/``namespace`` replaced by versions that cannot reach Python internals.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from molink.errors import MolinkError

# Names under which a message's reasoning may arrive; templates read the first.
_REASONING_KEYS = ("reasoning_content", "thinking", "reasoning")
# Appended to the final message to find where it ends in the rendered text.
_CONTINUE_MARKER = "CONTINUE_FINAL_MESSAGE_TAG "


class ChatTemplateError(MolinkError, ValueError):
    """There is no chat template, it does not compile, or it rejected the conversation."""


class _GenerationBlock(jinja2.ext.Extension):
    """Accepts ``{% generation %}...{% endgeneration %}`` (used for training masks) and renders
    its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render_body"), [], [], body).set_lineno(
            lineno
        )

    def _render_body(self, caller: Any) -> str:
        return caller()


class _SafeNamespace(jinja2.utils.Namespace):
    """A Jinja namespace that refuses attribute names starting with an underscore."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - mirrors Namespace's signature
        self, rest = args[0], args[1:]
        attributes = dict(*rest, **kwargs)
        for name in attributes:
            _check_attribute_name(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_attribute_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_attribute_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


class _SafeDict:
    """``dict(...)`` for templates, without exposing the ``dict`` type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format_string: str) -> str:
    return datetime.now().strftime(format_string)


def _make_environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    environment.globals["dict"] = _SafeDict()
    environment.globals["namespace"] = _SafeNamespace
    return environment


def plain_data(value: Any) -> Any:
    """A copy of ``value`` made only of JSON-like Python types, so the sandbox sees no methods
    of arbitrary objects; anything else becomes a ``<TypeName>`` placeholder."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {plain_data(key): plain_data(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain_data(item) for item in value]
    if isinstance(value, tuple):
        return tuple(plain_data(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain_data(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return plain_data(value.model_dump())
    return f"<{type(value).__name__}>"


def _prepare_messages(messages: list[Any]) -> list[dict[str, Any]]:
    """Drop None-valued keys (templates handle a missing key better than a None) and expose
    a message's reasoning under every name templates read it by."""
    prepared = []
    for message in plain_data(list(messages)):
        if not isinstance(message, dict):
            raise ChatTemplateError(f"chat messages must be objects, got {message!r}")
        message = {key: value for key, value in message.items() if value is not None}
        reasoning = next((message[k] for k in _REASONING_KEYS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        prepared.append(message)
    return prepared


class ChatTemplateRenderer:
    """Renders a tokenizer's chat template(s); compiled templates are cached per instance."""

    def __init__(
        self, templates: str | dict[str, str] | None, special_tokens: Mapping[str, str]
    ) -> None:
        self._templates = templates
        self._special_tokens = dict(special_tokens)
        self._environment = _make_environment()
        self._compiled: dict[str, jinja2.Template] = {}

    @property
    def default_template(self) -> str | None:
        return self.select(None, None) if self._templates is not None else None

    def select(self, chat_template: str | None, tools: list[Any] | None) -> str:
        """The template to use: a named one, an explicit template string, or the default."""
        templates = self._templates
        if isinstance(templates, dict):
            if chat_template is not None:
                return templates.get(chat_template, chat_template)
            if tools is not None and "tool_use" in templates:
                return templates["tool_use"]
            if "default" in templates:
                return templates["default"]
            raise ChatTemplateError(
                f"no default chat template; choose one of {sorted(templates)} with chat_template"
            )
        if chat_template is not None:
            return chat_template
        if templates is None:
            raise ChatTemplateError("this tokenizer has no chat template")
        return templates

    def render(
        self,
        messages: list[Any],
        add_generation_prompt: bool = True,
        *,
        tools: list[Any] | None = None,
        documents: list[Any] | None = None,
        chat_template: str | None = None,
        continue_final_message: bool = False,
        **kwargs: Any,
    ) -> str:
        if not messages:
            raise ChatTemplateError("cannot apply a chat template to an empty conversation")
        if continue_final_message and add_generation_prompt:
            raise ChatTemplateError(
                "continue_final_message and add_generation_prompt cannot both be set"
            )
        template = self._compile(self.select(chat_template, tools))
        chat = _prepare_messages(messages)
        if continue_final_message:
            _mark_final_message(chat)
        context = {**self._special_tokens, **plain_data(kwargs)}
        try:
            rendered = template.render(
                messages=chat,
                tools=plain_data(tools),
                documents=plain_data(documents),
                add_generation_prompt=add_generation_prompt,
                **context,
            )
        except Exception as error:
            # The template is foreign code: whatever it raises (a TemplateError from
            # raise_exception or the sandbox, a TypeError on unexpected message content...)
            # means this conversation cannot be rendered with it.
            raise ChatTemplateError(f"chat template error: {error}") from error
        return _cut_at_marker(rendered) if continue_final_message else rendered

    def _compile(self, source: str) -> jinja2.Template:
        compiled = self._compiled.get(source)
        if compiled is None:
            try:
                compiled = self._environment.from_string(source)
            except jinja2.exceptions.TemplateError as error:
                raise ChatTemplateError(f"chat template does not compile: {error}") from error
            self._compiled[source] = compiled
        return compiled


def _mark_final_message(chat: list[dict[str, Any]]) -> None:
    """Append the marker to the final message's text so its end can be found after rendering."""
    content = chat[-1].get("content")
    if isinstance(content, str):
        chat[-1]["content"] = content + _CONTINUE_MARKER
        return
    if isinstance(content, list):
        for block in reversed(content):
            if isinstance(block, dict) and isinstance(block.get("text"), str):
                block["text"] = block["text"] + _CONTINUE_MARKER
                return
    raise ChatTemplateError("continue_final_message is set but the final message has no text")


def _cut_at_marker(rendered: str) -> str:
    location = rendered.rfind(_CONTINUE_MARKER.strip())
    if location < 0:
        raise ChatTemplateError("the chat template dropped the final message to continue")
    if rendered.startswith(_CONTINUE_MARKER, location):
        return rendered[:location]
    # The template trimmed the message's trailing whitespace, so trim what precedes it too.
    return rendered[:location].rstrip()
