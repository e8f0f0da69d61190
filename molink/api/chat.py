"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from molink.api.context import ServerContext, get_context, new_request_id, usage_body
from molink.api.errors import APIError
from molink.api.logprobs import chat_logprobs
from molink.api.runner import GenerationRun
from molink.api.sampling import build_sampling_params, include_usage
from molink.api.schemas import ChatCompletionRequest, ChatMessage
from molink.api.streaming import (
    SSE,
    ChoiceCursor,
    cancel_on_disconnect,
    collect_final,
    stream_body,
)
from molink.outputs import CompletionOutput, RequestOutput
from molink.tokenizer.protocol import TokenizerLike

logger = logging.getLogger(__name__)
router = APIRouter()

_ROLE_ALIASES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "assistant",
}


@dataclass
class _Meta:
    request_id: str
    model: str
    n: int
    num_top_logprobs: int | None  # None: no logprobs
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    model = ctx.resolve_model(body.model)
    ctx.ensure_ready()
    _reject_unsupported(body)
    prompt_ids = render_chat_prompt(ctx.engine.tokenizer, body.messages, body)
    num_top = _num_top_logprobs(body)
    params = build_sampling_params(body, max_tokens=_max_tokens(body), logprobs=num_top)
    meta = _Meta(new_request_id("chatcmpl"), model, body.n, num_top)
    run = ctx.new_run([meta.request_id], [prompt_ids], params)
    if body.stream:
        firsts = await cancel_on_disconnect(request, run.start)
        if isinstance(firsts, Response):
            return firsts
        formatter = _StreamFormatter(ctx.engine.tokenizer, meta, include_usage(body))
        return StreamingResponse(
            stream_body(run, firsts, formatter, SSE), media_type=SSE.media_type
        )
    return await cancel_on_disconnect(request, lambda: _complete(ctx, run, meta))


def _reject_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise APIError(400, "tools are not supported by this server", "tools")
    if body.response_format is not None and body.response_format.type != "text":
        raise APIError(
            400, "only response_format type 'text' is supported by this server", "response_format"
        )


def _max_tokens(body: ChatCompletionRequest) -> int | None:
    """OpenAI's newer max_completion_tokens wins over max_tokens (as in vLLM).

    It is checked here so that an invalid value is reported under the name the client sent.
    """
    if body.max_completion_tokens is None:
        return body.max_tokens
    if body.max_completion_tokens < 1:
        raise APIError(
            400, "max_completion_tokens: must be an integer >= 1", "max_completion_tokens"
        )
    return body.max_completion_tokens


def _num_top_logprobs(body: ChatCompletionRequest) -> int | None:
    if not body.logprobs:
        if body.top_logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", "top_logprobs")
        return None
    return body.top_logprobs or 0


def to_template_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Plain {"role", "content"} dicts for the chat template; text parts are joined."""
    converted = []
    for index, message in enumerate(messages):
        role = _ROLE_ALIASES.get(message.role)
        if role is None:
            raise APIError(
                400,
                f"role {message.role!r} is not supported; use system, user or assistant",
                f"messages[{index}].role",
            )
        converted.append({"role": role, "content": _message_text(message, index)})
    return converted


def _message_text(message: ChatMessage, index: int) -> str:
    content = message.content
    if content is None:
        if message.role == "assistant":
            return ""
        raise APIError(400, "content is required", f"messages[{index}].content")
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise APIError(
                400,
                f"content part type {part.type!r} is not supported; only text parts are",
                f"messages[{index}].content",
            )
        texts.append(part.text)
    return "\n".join(texts)


def render_chat_prompt(
    tokenizer: TokenizerLike, messages: list[ChatMessage], body: Any
) -> list[int]:
    """Token ids of the templated conversation.

    The template already writes any BOS token, so the text is encoded without adding
    special tokens again.
    """
    template_messages = to_template_messages(messages)
    kwargs = dict(getattr(body, "chat_template_kwargs", None) or {})
    try:
        text = tokenizer.apply_chat_template(
            template_messages, add_generation_prompt=body.add_generation_prompt, **kwargs
        )
    except Exception as exc:
        logger.info("chat template rejected a conversation: %s", exc)
        raise APIError(400, f"the chat template rejected the messages: {exc}", "messages") from exc
    return tokenizer.encode(text, add_special_tokens=False)


async def _complete(ctx: ServerContext, run: GenerationRun, meta: _Meta) -> JSONResponse:
    try:
        firsts = await run.start()
        (final,) = await collect_final(run, firsts)
    finally:
        await run.close()
    tokenizer = ctx.engine.tokenizer
    choices = [
        {
            "index": choice.index,
            "message": {"role": "assistant", "content": choice.text},
            "logprobs": _logprobs(tokenizer, meta, choice, 0, len(choice.token_ids)),
            "finish_reason": choice.finish_reason,
            "stop_reason": choice.stop_reason,
        }
        for choice in sorted(final.outputs, key=lambda c: c.index)
    ]
    body = meta.envelope("chat.completion", choices)
    body["usage"] = usage_body(
        len(final.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs)
    )
    return JSONResponse(body)


def _logprobs(
    tokenizer: TokenizerLike, meta: _Meta, choice: CompletionOutput, start: int, end: int
) -> dict | None:
    if meta.num_top_logprobs is None:
        return None
    return chat_logprobs(tokenizer, choice, start, end, meta.num_top_logprobs)


class _StreamFormatter:
    """Chat chunks: a role chunk per choice, then content deltas, then the finish reason."""

    def __init__(self, tokenizer: TokenizerLike, meta: _Meta, include_usage: bool) -> None:
        self._tokenizer = tokenizer
        self._meta = meta
        self._include_usage = include_usage
        self._cursors: dict[int, ChoiceCursor] = {}
        self._prompt_tokens = 0
        self._completion_tokens: dict[int, int] = {}

    def on_start(self, firsts: list[RequestOutput]) -> list[dict]:
        (first,) = firsts
        self._prompt_tokens = len(first.prompt_token_ids)
        return [
            self._chunk(
                {
                    "index": index,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            )
            for index in range(self._meta.n)
        ]

    def on_output(self, _: int, output: RequestOutput) -> list[dict]:
        chunks = []
        for choice in output.outputs:
            delta = self._cursors.setdefault(choice.index, ChoiceCursor()).advance(choice)
            if delta is None:
                continue
            self._completion_tokens[choice.index] = len(choice.token_ids)
            item = {
                "index": choice.index,
                "delta": {"content": delta.text} if delta.text else {},
                "logprobs": _logprobs(
                    self._tokenizer, self._meta, choice, delta.start_token, delta.end_token
                ),
                "finish_reason": delta.finish_reason,
            }
            if delta.finish_reason is not None:
                item["stop_reason"] = choice.stop_reason
            chunks.append(self._chunk(item))
        return chunks

    def on_end(self) -> list[dict]:
        if not self._include_usage:
            return []
        chunk = self._meta.envelope("chat.completion.chunk", [])
        chunk["usage"] = usage_body(self._prompt_tokens, sum(self._completion_tokens.values()))
        return [chunk]

    def _chunk(self, choice: dict) -> dict:
        return self._meta.envelope("chat.completion.chunk", [choice])
