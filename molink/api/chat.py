"""POST /v1/chat/completions: messages through the model's chat template, streamed or not."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from molink.api.chat_render import render_chat_prompt
from molink.api.chat_stream import ChatStreamFormatter
from molink.api.context import ServerContext, get_context, new_request_id, usage_body
from molink.api.errors import APIError
from molink.api.logprobs import chat_logprobs, logprob_names
from molink.api.prompt_logprobs import vllm_prompt_logprobs
from molink.api.reasoning import split_reasoning
from molink.api.runner import GenerationRun
from molink.api.sampling import (
    build_sampling_params,
    check_max_logprobs,
    continuous_usage,
    include_usage,
    reject_streamed_prompt_logprobs,
    tokens_as_ids,
    with_default_max_tokens,
)
from molink.api.schemas import ChatCompletionRequest
from molink.api.streaming import SSE, cancel_on_disconnect, collect_final, stream_body
from molink.api.structured import check_spec, structured_spec
from molink.api.tool_choice import ToolPlan, plan_tools
from molink.api.truncation import truncated, truncation_length
from molink.outputs import CompletionOutput
from molink.tokenizer.protocol import TokenizerLike

router = APIRouter()


@dataclass
class ChatMeta:
    request_id: str
    model: str
    n: int
    num_top_logprobs: int | None  # None: no logprobs
    tools: ToolPlan
    want_prompt_logprobs: bool = False  # vLLM's prompt_logprobs, beside the choices
    echo_text: str = ""  # the final assistant message, sent back first with echo
    role: str = "assistant"  # of the reply: --response-role, or the last message's
    reasoning_parser: str | None = None  # None: the reply is all content
    include_reasoning: bool = True
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:N"
    # vLLM's: prompt_token_ids beside the choices, token_ids in each
    return_token_ids: bool = False
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, obj: str, choices: list[dict]) -> dict:
        return {
            "id": self.request_id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def logprobs(
        self, tokenizer: TokenizerLike, choice: CompletionOutput, start: int, end: int
    ) -> dict | None:
        if self.num_top_logprobs is None:
            return None
        names = logprob_names(tokenizer, self.tokens_as_ids)
        return chat_logprobs(names, choice, start, end, self.num_top_logprobs)


@router.post("/v1/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    model = ctx.resolve_model(body.model)
    ctx.ensure_ready()
    tools = plan_tools(ctx, body)
    constraint = structured_spec(body)
    if tools.constraint is not None:
        if constraint is not None:
            raise APIError(
                400, "tool_choice cannot be combined with another output constraint", "tools"
            )
        check_spec(tools.constraint, "tools")  # else the last stage fails the request
        constraint = tools.constraint
    num_top = _num_top_logprobs(body)
    reject_streamed_prompt_logprobs(body)
    check_max_logprobs(
        {"top_logprobs": body.top_logprobs, "prompt_logprobs": body.prompt_logprobs},
        ctx.chat.max_logprobs,
        per_prompt_token=("prompt_logprobs",),
    )
    params = build_sampling_params(
        body,
        max_tokens=_max_tokens(body),
        logprobs=num_top,
        vocab_size=ctx.engine.tokenizer.vocab_size,
        structured=constraint,
        defaults=ctx.chat.generation_defaults,
        tokenizer=ctx.engine.tokenizer,
    )
    # Rendering and tokenizing a long conversation takes a while: never on the event loop.
    prompt_ids = await asyncio.to_thread(render_chat_prompt, ctx, body.messages, body)
    if body.truncate_prompt_tokens is not None:
        keep = truncation_length(body.truncate_prompt_tokens, ctx.engine.max_model_len)
        prompt_ids = truncated(prompt_ids, keep)
    params = with_default_max_tokens(
        params, ctx.chat.generation_defaults, len(prompt_ids), ctx.engine.max_model_len
    )
    meta = ChatMeta(
        new_request_id("chatcmpl"),
        model,
        params.n,
        num_top,
        tools,
        want_prompt_logprobs=body.prompt_logprobs is not None,
        echo_text=_echo_text(body),
        role=_reply_role(ctx, body),
        reasoning_parser=_reasoning_parser(ctx, body, tools),
        include_reasoning=body.include_reasoning is not False,
        tokens_as_ids=tokens_as_ids(body, ctx.chat.return_tokens_as_token_ids),
        return_token_ids=bool(body.return_token_ids),
    )
    run = ctx.new_run([meta.request_id], [prompt_ids], params)
    if body.stream:
        firsts = await cancel_on_disconnect(request, run.start)
        if isinstance(firsts, Response):
            return firsts
        formatter = ChatStreamFormatter(
            ctx.engine.tokenizer,
            meta,
            include_usage(body, ctx.chat.force_include_usage),
            continuous_usage(body),
        )
        return StreamingResponse(
            stream_body(run, firsts, formatter, SSE), media_type=SSE.media_type
        )
    return await cancel_on_disconnect(request, lambda: _complete(ctx, run, meta))


def _echo_text(body: ChatCompletionRequest) -> str:
    """With echo, the final message (when it is the assistant's) opens the reply."""
    if not body.echo:
        return ""
    last = body.messages[-1]
    if last.role != "assistant" or last.content is None:
        return ""
    if isinstance(last.content, str):
        return last.content
    return "\n".join(part.text or "" for part in last.content)


def _reply_role(ctx: ServerContext, body: ChatCompletionRequest) -> str:
    """As vLLM: --response-role after a generation prompt, else the reply continues the
    last message, whose role it keeps."""
    generation_prompt = body.add_generation_prompt
    if generation_prompt is None:
        generation_prompt = not body.continue_final_message
    return ctx.chat.response_role if generation_prompt else body.messages[-1].role


def _reasoning_parser(
    ctx: ServerContext, body: ChatCompletionRequest, tools: ToolPlan
) -> str | None:
    """The parser that splits this reply: none for a constrained reply (the grammar holds
    from its first token, so it has no thoughts; auto tool choice leaves text free until a
    call opens), nor for Qwen3 told not to think."""
    parser = ctx.chat.reasoning_parser
    if parser is None or tools.mode in ("named", "required") or structured_spec(body):
        return None
    thinking = (body.chat_template_kwargs or {}).get("enable_thinking", True)
    if parser == "qwen3" and thinking is False:
        return None
    return parser


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


async def _complete(ctx: ServerContext, run: GenerationRun, meta: ChatMeta) -> JSONResponse:
    try:
        firsts = await run.start()
        (final,) = await collect_final(run, firsts)
    finally:
        await run.close()
    tokenizer = ctx.engine.tokenizer
    choices = [
        {
            "index": choice.index,
            "message": _message(meta, choice.text),
            "logprobs": meta.logprobs(tokenizer, choice, 0, len(choice.token_ids)),
            "finish_reason": _finish_reason(meta, choice),
            "stop_reason": choice.stop_reason,
            **({"token_ids": list(choice.token_ids)} if meta.return_token_ids else {}),
        }
        for choice in sorted(final.outputs, key=lambda c: c.index)
    ]
    body = meta.envelope("chat.completion", choices)
    if meta.want_prompt_logprobs:
        body["prompt_logprobs"] = vllm_prompt_logprobs(
            tokenizer, final.prompt_token_ids, final.prompt_logprobs
        )
    if meta.return_token_ids:
        body["prompt_token_ids"] = list(final.prompt_token_ids)
    body["usage"] = usage_body(
        len(final.prompt_token_ids), sum(len(c.token_ids) for c in final.outputs)
    )
    return JSONResponse(body)


def _message(meta: ChatMeta, text: str) -> dict:
    reasoning, rest = _split(meta, text)
    content, calls = meta.tools.read(rest) if rest is not None else (None, [])
    if meta.echo_text:  # with tool calls too, as vLLM does and a stream sends it
        content = meta.echo_text + (content or "")
    message: dict = {"role": meta.role, "content": content}
    if reasoning is not None and meta.include_reasoning:
        message["reasoning_content"] = reasoning
    if calls:
        message["tool_calls"] = [call.to_openai() for call in calls]
    return message


def _split(meta: ChatMeta, text: str) -> tuple[str | None, str | None]:
    """(reasoning, the rest) of a whole reply; all of it is the rest without a parser."""
    if meta.reasoning_parser is None:
        return None, text
    split = split_reasoning(meta.reasoning_parser, text)
    return split.reasoning, split.content


def _finish_reason(meta: ChatMeta, choice: CompletionOutput) -> str | None:
    if choice.finish_reason == "stop" and meta.tools.mode in ("auto", "required"):
        _, rest = _split(meta, choice.text)
        _, calls = meta.tools.read(rest) if rest is not None else (None, [])
        if calls:
            return "tool_calls"
    return choice.finish_reason
