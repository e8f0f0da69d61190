"""POST /generate: vLLM's simple API (``{"prompt", "stream", **sampling}`` -> ``{"text": [...]}``).

Streaming writes one JSON object per line, each with the full text so far of every choice,
as vLLM's demo server does.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from molink.api.bad_words import bad_words_token_ids
from molink.api.chat_render import check_unicode_field
from molink.api.context import ServerContext, get_context, new_request_id
from molink.api.errors import APIError
from molink.api.runner import GenerationRun, Prompt
from molink.api.sampling import allowed_token_ids, check_max_logprobs, logit_bias
from molink.api.streaming import JSON_LINES, cancel_on_disconnect, collect_final, stream_body
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams
from molink.tokenizer.protocol import TokenizerLike

router = APIRouter()

# Fields whose wire form differs from a JSON value are converted here or not offered.
_SAMPLING_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)} - {
    "extra",
    "structured",
    "prompt_logprobs",
    "bad_words_token_ids",  # sent as bad_words (words, tokenized here)
}
_BOOL_FIELDS = {
    "ignore_eos",
    "skip_special_tokens",
    "include_stop_str_in_output",
    "spaces_between_special_tokens",
}


@router.post("/generate")
async def generate(request: Request) -> Response:
    ctx = get_context(request)
    body = await _json_object(request)
    ctx.resolve_model(_optional_str(body.pop("model", None), "model"))
    prompt = _prompt(body.pop("prompt", None), ctx.engine.tokenizer.vocab_size)
    stream = body.pop("stream", False)
    if not isinstance(stream, bool):
        raise APIError(400, "stream must be a boolean", "stream")
    if isinstance(prompt, str):
        ctx.check_prompt_size(len(prompt), "prompt")
        check_unicode_field(prompt, "prompt")
    if "logit_bias" in body:
        bias = body["logit_bias"]
        if bias is not None and not isinstance(bias, dict):
            raise APIError(400, "logit_bias must map token ids to numbers", "logit_bias")
        body["logit_bias"] = logit_bias(bias, ctx.engine.tokenizer.vocab_size)
    if "allowed_token_ids" in body:
        vocab_size = ctx.engine.tokenizer.vocab_size
        body["allowed_token_ids"] = allowed_token_ids(body["allowed_token_ids"], vocab_size)
    bad_words = bad_words_token_ids(body.pop("bad_words", None), ctx.engine.tokenizer)
    params = sampling_params_from_dict(body)
    if bad_words:
        params = dataclasses.replace(params, bad_words_token_ids=bad_words)
    check_max_logprobs({"logprobs": params.logprobs}, ctx.chat.max_logprobs)
    ctx.ensure_ready()
    run = ctx.new_run([new_request_id("gen")], [prompt], params)
    if stream:
        firsts = await cancel_on_disconnect(request, run.start)
        if isinstance(firsts, Response):
            return firsts
        formatter = _StreamFormatter(ctx.engine.tokenizer, prompt)
        return StreamingResponse(
            stream_body(run, firsts, formatter, JSON_LINES), media_type=JSON_LINES.media_type
        )
    return await cancel_on_disconnect(request, lambda: _complete(ctx, run, prompt))


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _optional_str(value: Any, name: str) -> str | None:
    if value is not None and not isinstance(value, str):
        raise APIError(400, f"{name} must be a string", name)
    return value


def _prompt(value: Any, vocab_size: int) -> Prompt:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(_is_token_id(t, vocab_size) for t in value):
        return list(value)
    raise APIError(400, "prompt must be a string or a non-empty list of token ids", "prompt")


def _is_token_id(value: Any, vocab_size: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab_size


def sampling_params_from_dict(fields: dict[str, Any]) -> SamplingParams:
    """vLLM passes the remaining body to SamplingParams; unknown keys are named, not ignored."""
    for name, value in fields.items():
        if name not in _SAMPLING_FIELDS:
            raise APIError(400, f"unknown sampling parameter {name!r}", name)
        if name in _BOOL_FIELDS and not isinstance(value, bool):
            raise APIError(400, f"{name} must be a boolean", name)
    if "stop" in fields and not isinstance(fields["stop"], (str, list, type(None))):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if "stop_token_ids" in fields and not isinstance(fields["stop_token_ids"], (list, type(None))):
        raise APIError(400, "stop_token_ids must be a list of token ids", "stop_token_ids")
    return SamplingParams(**fields)


def _texts(tokenizer: TokenizerLike, prompt: Prompt, output: RequestOutput) -> list[str]:
    if isinstance(prompt, str):
        prefix = prompt
    elif output.prompt_text is not None:
        prefix = output.prompt_text
    else:
        prefix = tokenizer.decode(list(prompt), skip_special_tokens=False)
    return [prefix + choice.text for choice in sorted(output.outputs, key=lambda c: c.index)]


async def _complete(ctx: ServerContext, run: GenerationRun, prompt: Prompt) -> JSONResponse:
    try:
        firsts = await run.start()
        (final,) = await collect_final(run, firsts)
    finally:
        await run.close()
    return JSONResponse({"text": _texts(ctx.engine.tokenizer, prompt, final)})


class _StreamFormatter:
    def __init__(self, tokenizer: TokenizerLike, prompt: Prompt) -> None:
        self._tokenizer = tokenizer
        self._prompt = prompt

    def on_start(self, firsts: list[RequestOutput]) -> list[dict]:
        return []

    def on_output(self, _: int, output: RequestOutput) -> list[dict]:
        return [{"text": _texts(self._tokenizer, self._prompt, output)}]

    def on_end(self) -> list[dict]:
        return []
