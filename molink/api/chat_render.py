"""Chat messages (with tool calls and tool results) through the model's chat template.

Messages reach the template as transformers passes them: ``tool_calls`` with their
``function.arguments`` as a mapping (OpenAI clients send a JSON string; templates such as
Qwen's and Llama's read the mapping), ``tool`` messages with ``tool_call_id``, and the
``tools`` list as OpenAI's function specs.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any, Protocol

from molink.api.context import ServerContext
from molink.api.errors import APIError
from molink.api.schemas import ChatMessage, Tool, ToolCall
from molink.tokenizer.tokenizer import check_unicode

logger = logging.getLogger(__name__)

_ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
    "tool": "tool",
}


CONTENT_FORMATS = ("auto", "string", "openai")
# A loop over a message's content (message['content'] or message.content, whatever the
# loop variable is called): such a template reads OpenAI's list of parts.
_CONTENT_LOOP = re.compile(r"\bfor\s+\w+\s+in\s+\w+\s*(?:\[\s*['\"]content['\"]\s*\]|\.content\b)")


def content_format_of(setting: str, template: str | None) -> str:
    """--chat-template-content-format: ``auto`` is ``openai`` for a template that loops
    over a message's content, else ``string`` (as vLLM detects it)."""
    if setting != "auto":
        return setting
    return "openai" if template and _CONTENT_LOOP.search(template) else "string"


def to_template_messages(
    messages: list[ChatMessage], content_format: str = "string"
) -> list[dict[str, Any]]:
    """``content_format`` openai: each content is a list of text parts (a string is one
    part, no content none), as vLLM passes it; string: the parts' texts joined by lines."""
    converted = []
    for index, message in enumerate(messages):
        role = _ROLE_ALIASES.get(message.role)
        if role is None:
            raise APIError(
                400,
                f"role {message.role!r} is not supported; use system, user, assistant or tool",
                f"messages[{index}].role",
            )
        texts = _message_texts(message, index)
        content: str | list[dict[str, str]] = (
            [{"type": "text", "text": text} for text in texts]
            if content_format == "openai"
            else "\n".join(texts)
        )
        item: dict[str, Any] = {"role": role, "content": content}
        if message.tool_calls:
            item["tool_calls"] = [_tool_call(c, index) for c in message.tool_calls]
        if role == "tool":
            if message.tool_call_id is None:
                raise APIError(400, "tool_call_id is required", f"messages[{index}].tool_call_id")
            item["tool_call_id"] = message.tool_call_id
        if message.name is not None:
            item["name"] = message.name
        converted.append(item)
    return converted


def _tool_call(call: ToolCall, index: int) -> dict[str, Any]:
    arguments = call.function.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            raise APIError(
                400,
                f"tool call arguments are not valid JSON: {exc}",
                f"messages[{index}].tool_calls",
            ) from None
    result: dict[str, Any] = {
        "type": "function",
        "function": {"name": call.function.name, "arguments": arguments},
    }
    if call.id is not None:
        result["id"] = call.id
    return result


def _message_texts(message: ChatMessage, index: int) -> list[str]:
    """The texts of a message's content: one for a string, one per part of a list."""
    content = message.content
    field = f"messages[{index}].content"
    if content is None:
        if message.role == "assistant":
            return []
        raise APIError(400, "content is required", field)
    if isinstance(content, str):
        check_unicode_field(content, field)
        return [content]
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(
                400,
                f"content part type {part.type!r} is not supported; only text parts are",
                field,
            )
        check_unicode_field(part.text, field)
        texts.append(part.text)
    return texts


def check_unicode_field(text: str, field: str) -> None:
    try:
        check_unicode(text, field)
    except Exception as exc:
        raise APIError(400, str(exc), field) from None


def conversation_chars(messages: list[ChatMessage]) -> int:
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += len(message.content)
        elif message.content is not None:
            total += sum(len(part.text or "") for part in message.content)
    return total


class ChatRenderOptions(Protocol):
    """What a request says about rendering its conversation (chat completions, tokenize)."""

    @property
    def add_generation_prompt(self) -> bool | None: ...
    @property
    def continue_final_message(self) -> bool | None: ...
    @property
    def chat_template(self) -> str | None: ...
    @property
    def chat_template_kwargs(self) -> dict[str, Any] | None: ...
    @property
    def tools(self) -> list[Tool] | None: ...
    @property
    def add_special_tokens(self) -> bool | None: ...
    @property
    def documents(self) -> list[dict[str, str]] | None: ...
    @property
    def reasoning_effort(self) -> str | None: ...


def render_chat_text(
    ctx: ServerContext, messages: list[ChatMessage], body: ChatRenderOptions
) -> str:
    """The templated conversation as text (the template writes any BOS token itself)."""
    kwargs = dict(body.chat_template_kwargs or {})
    template = body.chat_template
    # A template sent as a template keyword would be used too: the flag covers both ways.
    sent = (("chat_template", template), ("chat_template_kwargs", kwargs.get("chat_template")))
    for field, value in sent:
        if value is not None and not ctx.chat.trust_request_chat_template:
            raise APIError(
                400,
                f"a chat template in {field} is refused unless the server runs with "
                "--trust-request-chat-template",
                field,
            )
    template = template or ctx.chat.chat_template
    if template is not None:
        kwargs["chat_template"] = template
    content_format = content_format_of(
        ctx.chat.chat_template_content_format,
        _template_text(kwargs.get("chat_template"), ctx.engine.tokenizer),
    )
    template_messages = to_template_messages(messages, content_format)
    if body.tools:
        kwargs["tools"] = [tool.model_dump(exclude_none=True) for tool in body.tools]
    if body.documents is not None:
        kwargs.setdefault("documents", body.documents)  # chat_template_kwargs win, as in vLLM
    if body.reasoning_effort is not None:
        kwargs.setdefault("reasoning_effort", body.reasoning_effort)
    # As in vLLM, chat_template_kwargs may set these too, and win over the fields.
    continue_final = bool(_flag(kwargs, "continue_final_message", body.continue_final_message))
    add_generation_prompt = _flag(kwargs, "add_generation_prompt", body.add_generation_prompt)
    if continue_final and add_generation_prompt:
        # The reply either goes on with the last message or starts a new one (vLLM: 400).
        raise APIError(
            400,
            "continue_final_message and add_generation_prompt cannot both be true: the reply "
            "either continues the final message or starts a new one",
            "continue_final_message",
        )
    if add_generation_prompt is None:
        add_generation_prompt = not continue_final
    if continue_final:
        kwargs["continue_final_message"] = True
        if template_messages[-1]["role"] != "assistant":
            raise APIError(
                400, "continue_final_message needs a final assistant message", "messages"
            )
    try:
        return ctx.engine.tokenizer.apply_chat_template(
            template_messages, add_generation_prompt=add_generation_prompt, **kwargs
        )
    except Exception as exc:
        logger.info("chat template rejected a conversation: %s", exc)
        raise APIError(400, f"the chat template rejected the messages: {exc}", "messages") from exc


def _template_text(template: str | None, tokenizer: Any) -> str | None:
    """The template text a render uses: the one given (a name picks one of the
    tokenizer's, whose default stands for it here), else the tokenizer's default."""
    if template is not None and "{" in template:
        return template
    return getattr(tokenizer, "chat_template", None)


def _flag(kwargs: dict[str, Any], name: str, default: bool | None) -> bool | None:
    """Takes ``name`` out of the template keywords (the renderer gets it on its own)."""
    if name not in kwargs:
        return default
    value = kwargs.pop(name)
    if not isinstance(value, bool):
        raise APIError(
            400, f"chat_template_kwargs: {name} must be a boolean", "chat_template_kwargs"
        )
    return value


def render_chat_prompt(
    ctx: ServerContext, messages: list[ChatMessage], body: ChatRenderOptions
) -> list[int]:
    """Token ids of the templated conversation; refused by size before tokenizing."""
    ctx.check_prompt_size(conversation_chars(messages), "messages")
    text = render_chat_text(ctx, messages, body)
    tokenizer = ctx.engine.tokenizer
    token_ids = tokenizer.encode(text, add_special_tokens=False)
    if body.add_special_tokens:
        token_ids = _with_bos(token_ids, tokenizer.bos_token_id)
    return token_ids


def _with_bos(token_ids: list[int], bos_token_id: int | None) -> list[int]:
    """vLLM's add_special_tokens for a conversation; a template that writes the BOS itself
    does not get a second one."""
    if bos_token_id is None or (token_ids and token_ids[0] == bos_token_id):
        return token_ids
    return [bos_token_id, *token_ids]
