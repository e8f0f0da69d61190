"""POST /v1/completions: OpenAI's (legacy) text completions, streamed or not."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from molink.api.context import (
    ServerContext,
    get_context,
    new_request_id,
    sub_request_ids,
    usage_body,
)
from molink.api.errors import APIError
from molink.api.logprobs import completion_logprobs
from molink.api.runner import GenerationRun, Prompt
from molink.api.sampling import build_sampling_params, include_usage
from molink.api.schemas import CompletionRequest
from molink.api.streaming import (
    SSE,
    ChoiceCursor,
    cancel_on_disconnect,
    collect_final,
    stream_body,
)
from molink.outputs import RequestOutput
from molink.tokenizer.protocol import TokenizerLike

router = APIRouter()


@dataclass
class _Meta:
    """What every response object of one request repeats."""

    request_id: str
    model: str
    n: int
    echo: bool
    want_logprobs: bool
    prompts: list[Prompt]
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, choices: list[dict]) -> dict:
        return {
            "id": self.request_id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }


@router.post("/v1/completions")
async def create_completion(body: CompletionRequest, request: Request) -> Response:
    ctx = get_context(request)
    model = ctx.resolve_model(body.model)
    ctx.ensure_ready()
    _reject_unsupported(body)
    prompts = normalize_prompts(body.prompt, ctx.engine.tokenizer.vocab_size)
    params = build_sampling_params(body, max_tokens=body.max_tokens, logprobs=body.logprobs)
    request_id = new_request_id("cmpl")
    run = ctx.new_run(sub_request_ids(request_id, len(prompts)), prompts, params)
    meta = _Meta(request_id, model, body.n, body.echo, body.logprobs is not None, prompts)
    if body.stream:
        firsts = await cancel_on_disconnect(request, run.start)
        if isinstance(firsts, Response):
            return firsts
        formatter = _StreamFormatter(ctx.engine.tokenizer, meta, include_usage(body))
        return StreamingResponse(
            stream_body(run, firsts, formatter, SSE), media_type=SSE.media_type
        )
    return await cancel_on_disconnect(request, lambda: _complete(ctx, run, meta))


def _reject_unsupported(body: CompletionRequest) -> None:
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported by this server", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise APIError(
            400, "best_of must equal n: this server does not rank extra candidates", "best_of"
        )
    if body.echo and body.logprobs is not None:
        raise APIError(
            400,
            "echo cannot be combined with logprobs: prompt logprobs are not computed",
            "echo",
        )


def normalize_prompts(prompt: str | list, vocab_size: int) -> list[Prompt]:
    """One engine prompt per element: a string, a token list, or a list of either."""
    if isinstance(prompt, str):
        return [prompt]
    if not prompt:
        raise APIError(400, "prompt must not be empty", "prompt")
    if isinstance(prompt[0], int):
        prompts: list[Prompt] = [list(prompt)]
    else:
        prompts = list(prompt)
    for item in prompts:
        if isinstance(item, list):
            _check_token_ids(item, vocab_size)
    return prompts


def _check_token_ids(token_ids: list[int], vocab_size: int) -> None:
    if not token_ids:
        raise APIError(400, "a token-id prompt must not be empty", "prompt")
    bad = [t for t in token_ids if not 0 <= t < vocab_size]
    if bad:
        raise APIError(
            400, f"token id {bad[0]} is outside the vocabulary [0, {vocab_size})", "prompt"
        )


def _prompt_text(tokenizer: TokenizerLike, prompt: Prompt, output: RequestOutput) -> str:
    if isinstance(prompt, str):
        return prompt
    if output.prompt_text is not None:
        return output.prompt_text
    return tokenizer.decode(list(prompt), skip_special_tokens=False)


async def _complete(ctx: ServerContext, run: GenerationRun, meta: _Meta) -> JSONResponse:
    try:
        firsts = await run.start()
        finals = await collect_final(run, firsts)
    finally:
        await run.close()
    tokenizer = ctx.engine.tokenizer
    choices: list[dict] = []
    for prompt_index, output in enumerate(finals):
        prefix = _prompt_text(tokenizer, meta.prompts[prompt_index], output) if meta.echo else ""
        for choice in sorted(output.outputs, key=lambda c: c.index):
            logprobs = None
            if meta.want_logprobs:
                logprobs, _ = completion_logprobs(tokenizer, choice, 0, len(choice.token_ids), 0)
            choices.append(
                {
                    "index": prompt_index * meta.n + choice.index,
                    "text": prefix + choice.text,
                    "logprobs": logprobs,
                    "finish_reason": choice.finish_reason,
                    "stop_reason": choice.stop_reason,
                }
            )
    body = meta.envelope(choices)
    body["usage"] = usage_body(
        sum(len(o.prompt_token_ids) for o in finals),
        sum(len(c.token_ids) for o in finals for c in o.outputs),
    )
    return JSONResponse(body)


class _StreamFormatter:
    """Turns cumulative outputs into completion chunks, one choice per chunk."""

    def __init__(self, tokenizer: TokenizerLike, meta: _Meta, include_usage: bool) -> None:
        self._tokenizer = tokenizer
        self._meta = meta
        self._include_usage = include_usage
        self._cursors: dict[int, ChoiceCursor] = {}
        self._offsets: dict[int, int] = {}
        self._prompt_tokens: dict[int, int] = {}
        self._completion_tokens: dict[int, int] = {}

    def on_start(self, firsts: list[RequestOutput]) -> list[dict]:
        chunks = []
        for prompt_index, first in enumerate(firsts):
            self._prompt_tokens[prompt_index] = len(first.prompt_token_ids)
            if not self._meta.echo:
                continue
            text = _prompt_text(self._tokenizer, self._meta.prompts[prompt_index], first)
            for choice_index in range(self._meta.n):
                index = prompt_index * self._meta.n + choice_index
                self._offsets[index] = len(text)
                chunks.append(self._meta.envelope([_stream_choice(index, text, None, None)]))
        return chunks

    def on_output(self, prompt_index: int, output: RequestOutput) -> list[dict]:
        chunks = []
        for choice in output.outputs:
            index = prompt_index * self._meta.n + choice.index
            delta = self._cursors.setdefault(index, ChoiceCursor()).advance(choice)
            if delta is None:
                continue
            self._completion_tokens[index] = len(choice.token_ids)
            logprobs = None
            if self._meta.want_logprobs:
                logprobs, self._offsets[index] = completion_logprobs(
                    self._tokenizer,
                    choice,
                    delta.start_token,
                    delta.end_token,
                    self._offsets.get(index, 0),
                )
            item = _stream_choice(index, delta.text, logprobs, delta.finish_reason)
            if delta.finish_reason is not None:
                item["stop_reason"] = choice.stop_reason
            chunks.append(self._meta.envelope([item]))
        return chunks

    def on_end(self) -> list[dict]:
        if not self._include_usage:
            return []
        chunk = self._meta.envelope([])
        chunk["usage"] = usage_body(
            sum(self._prompt_tokens.values()), sum(self._completion_tokens.values())
        )
        return [chunk]


def _stream_choice(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
