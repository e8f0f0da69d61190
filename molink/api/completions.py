"""POST /v1/completions: OpenAI's (legacy) text completions, streamed or not."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from molink.api.chat_render import check_unicode_field
from molink.api.context import (
    ServerContext,
    get_context,
    new_request_id,
    sub_request_ids,
    usage_body,
)
from molink.api.errors import APIError
from molink.api.logprobs import completion_logprobs, logprob_names
from molink.api.prompt_logprobs import echo_logprobs, join_logprobs, vllm_prompt_logprobs
from molink.api.runner import GenerationRun, Prompt
from molink.api.sampling import (
    build_sampling_params,
    check_max_logprobs,
    continuous_usage,
    include_usage,
    reject_streamed_prompt_logprobs,
    tokens_as_ids,
    with_default_max_tokens,
)
from molink.api.schemas import CompletionRequest
from molink.api.streaming import (
    SSE,
    ChoiceCursor,
    cancel_on_disconnect,
    collect_final,
    stream_body,
)
from molink.api.structured import structured_spec
from molink.api.truncation import truncated, truncation_length
from molink.outputs import RequestOutput
from molink.sampling_params import SamplingParams
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
    score_only: bool = False  # max_tokens 0: the prompt is scored, nothing is generated
    want_prompt_logprobs: bool = False  # vLLM's prompt_logprobs field in each choice
    tokens_as_ids: bool = False  # logprobs name tokens "token_id:N"
    return_token_ids: bool = False  # vLLM's prompt_token_ids and token_ids in each choice
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
    reject_streamed_prompt_logprobs(body)  # before echo asks for them itself
    check_max_logprobs(
        {"logprobs": body.logprobs, "prompt_logprobs": body.prompt_logprobs},
        ctx.chat.max_logprobs,
        # With echo, logprobs asks for the prompt's too.
        per_prompt_token=("prompt_logprobs", "logprobs") if body.echo else ("prompt_logprobs",),
    )
    prompts = normalize_prompts(body.prompt, ctx.engine.tokenizer.vocab_size)
    for prompt in prompts:
        if isinstance(prompt, str):
            ctx.check_prompt_size(len(prompt), "prompt")
            check_unicode_field(prompt, "prompt")
    score_only = body.max_tokens == 0
    echo = bool(body.echo)
    if score_only and body.stream:
        raise APIError(400, "max_tokens 0 cannot be streamed", "max_tokens")
    prompt_logprobs = body.prompt_logprobs
    if echo and body.logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, body.logprobs)
    if score_only and prompt_logprobs is None and not echo:
        raise APIError(400, "max_tokens must be >= 1 without echo or prompt_logprobs", "max_tokens")
    body = body.model_copy(update={"prompt_logprobs": prompt_logprobs})
    params = build_sampling_params(
        body,
        max_tokens=1 if score_only else body.max_tokens,
        logprobs=body.logprobs,
        vocab_size=ctx.engine.tokenizer.vocab_size,
        structured=structured_spec(body),
        defaults=ctx.chat.generation_defaults,
        tokenizer=ctx.engine.tokenizer,
    )
    request_id = new_request_id("cmpl")
    engine_prompts = await _engine_prompts(ctx.engine.tokenizer, prompts, body.add_special_tokens)
    if body.truncate_prompt_tokens is not None:
        keep = truncation_length(body.truncate_prompt_tokens, ctx.engine.max_model_len)
        whole = await _tokenized(ctx.engine.tokenizer, engine_prompts)
        engine_prompts = [truncated(ids, keep) for ids in whole]
        prompts = list(engine_prompts)  # an echo shows what the model read
    per_prompt: SamplingParams | list[SamplingParams] = params
    if params.max_tokens is None and "max_tokens" in ctx.chat.generation_defaults:
        engine_prompts = await _tokenized(ctx.engine.tokenizer, engine_prompts)
        per_prompt = [
            with_default_max_tokens(
                params, ctx.chat.generation_defaults, len(ids), ctx.engine.max_model_len
            )
            for ids in engine_prompts
        ]
    run = ctx.new_run(sub_request_ids(request_id, len(prompts)), engine_prompts, per_prompt)
    meta = _Meta(
        request_id,
        model,
        params.n,
        echo,
        body.logprobs is not None,
        prompts,
        score_only=score_only,
        want_prompt_logprobs=body.prompt_logprobs is not None,
        tokens_as_ids=tokens_as_ids(body, ctx.chat.return_tokens_as_token_ids),
        return_token_ids=bool(body.return_token_ids),
    )
    if body.stream:
        firsts = await cancel_on_disconnect(request, run.start)
        if isinstance(firsts, Response):
            return firsts
        formatter = _StreamFormatter(
            ctx.engine.tokenizer,
            meta,
            include_usage(body, ctx.chat.force_include_usage),
            continuous_usage(body),
        )
        return StreamingResponse(
            stream_body(run, firsts, formatter, SSE), media_type=SSE.media_type
        )
    return await cancel_on_disconnect(request, lambda: _complete(ctx, run, meta))


def _reject_unsupported(body: CompletionRequest) -> None:
    if body.suffix is not None:
        raise APIError(400, "suffix is not supported by this server", "suffix")
    n = 1 if body.n is None else body.n
    if body.best_of is not None and body.best_of != n:
        raise APIError(
            400, "best_of must equal n: this server does not rank extra candidates", "best_of"
        )
    if body.max_tokens is not None and body.max_tokens < 0:
        raise APIError(400, "max_tokens: must be an integer >= 0", "max_tokens")


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


async def _engine_prompts(
    tokenizer: TokenizerLike, prompts: list[Prompt], add_special_tokens: bool | None
) -> list[Prompt]:
    """Without special tokens, text prompts are tokenized here (the engine would add them);
    echo still answers with the text as it was sent."""
    if add_special_tokens is not False:
        return prompts
    encoded = [
        await asyncio.to_thread(tokenizer.encode, prompt, False)
        if isinstance(prompt, str)
        else prompt
        for prompt in prompts
    ]
    if not all(encoded):
        raise APIError(400, "prompt: must not be empty", "prompt")
    return encoded


async def _tokenized(tokenizer: TokenizerLike, prompts: list[Prompt]) -> list[list[int]]:
    """Text prompts tokenized as the engine would (special tokens added), to know their
    lengths here."""
    return [
        await asyncio.to_thread(tokenizer.encode, prompt) if isinstance(prompt, str) else prompt
        for prompt in prompts
    ]


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
            choices.append(_choice(tokenizer, meta, prompt_index, prefix, output, choice))
    body = meta.envelope(choices)
    num_generated = (
        0 if meta.score_only else sum(len(c.token_ids) for o in finals for c in o.outputs)
    )
    body["usage"] = usage_body(sum(len(o.prompt_token_ids) for o in finals), num_generated)
    return JSONResponse(body)


def _choice(
    tokenizer: TokenizerLike,
    meta: _Meta,
    prompt_index: int,
    prefix: str,
    output: RequestOutput,
    choice,
) -> dict:
    text = "" if meta.score_only else choice.text
    logprobs = None
    if meta.want_logprobs:
        generated = None
        offset = 0
        names = logprob_names(tokenizer, meta.tokens_as_ids)
        if meta.echo:
            logprobs, offset = echo_logprobs(names, output.prompt_token_ids, output.prompt_logprobs)
        if not meta.score_only:
            generated, _ = completion_logprobs(names, choice, 0, len(choice.token_ids), offset)
        logprobs = generated if logprobs is None else join_logprobs(logprobs, generated)
    item = {
        "index": prompt_index * meta.n + choice.index,
        "text": prefix + text,
        "logprobs": logprobs,
        "finish_reason": "length" if meta.score_only else choice.finish_reason,
        "stop_reason": None if meta.score_only else choice.stop_reason,
    }
    if meta.return_token_ids:
        item["token_ids"] = [] if meta.score_only else list(choice.token_ids)
    if meta.want_prompt_logprobs:
        item["prompt_logprobs"] = vllm_prompt_logprobs(
            tokenizer, output.prompt_token_ids, output.prompt_logprobs
        )
    if meta.return_token_ids:
        item["prompt_token_ids"] = list(output.prompt_token_ids)
    return item


class _StreamFormatter:
    """Turns cumulative outputs into completion chunks, one choice per chunk."""

    def __init__(
        self, tokenizer: TokenizerLike, meta: _Meta, include_usage: bool, continuous: bool
    ) -> None:
        self._tokenizer = tokenizer
        self._names = logprob_names(tokenizer, meta.tokens_as_ids)
        self._meta = meta
        self._include_usage = include_usage
        self._continuous = continuous and include_usage
        self._cursors: dict[int, ChoiceCursor] = {}
        self._offsets: dict[int, int] = {}
        self._prompt_tokens: dict[int, int] = {}
        self._completion_tokens: dict[int, int] = {}
        # With return_token_ids: each prompt's ids, until the first chunk of each of its
        # choices has carried them.
        self._prompt_ids: dict[int, list[int]] = {}

    def on_start(self, firsts: list[RequestOutput]) -> list[dict]:
        chunks = []
        for prompt_index, first in enumerate(firsts):
            self._prompt_tokens[prompt_index] = len(first.prompt_token_ids)
            if self._meta.return_token_ids:
                for choice_index in range(self._meta.n):
                    index = prompt_index * self._meta.n + choice_index
                    self._prompt_ids[index] = list(first.prompt_token_ids)
            if not self._meta.echo:
                continue
            text = _prompt_text(self._tokenizer, self._meta.prompts[prompt_index], first)
            logprobs = None
            # The generated tokens' offsets go on from the prompt tokens' texts, as in a
            # non-streamed answer (a "<s>" counts, though the echoed prompt lacks it).
            offset = len(text)
            if self._meta.want_logprobs:
                logprobs, offset = echo_logprobs(
                    self._names, first.prompt_token_ids, first.prompt_logprobs
                )
            for choice_index in range(self._meta.n):
                index = prompt_index * self._meta.n + choice_index
                self._offsets[index] = offset
                item = _stream_choice(index, text, logprobs, None)
                chunks.append(self._chunk(self._with_token_ids(index, item, [])))
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
                    self._names,
                    choice,
                    delta.start_token,
                    delta.end_token,
                    self._offsets.get(index, 0),
                )
            item = _stream_choice(index, delta.text, logprobs, delta.finish_reason)
            if delta.finish_reason is not None:
                item["stop_reason"] = choice.stop_reason
            new_ids = choice.token_ids[delta.start_token : delta.end_token]
            chunks.append(self._chunk(self._with_token_ids(index, item, new_ids)))
        return chunks

    def _with_token_ids(self, index: int, item: dict, new_ids: list[int]) -> dict:
        """vLLM's return_token_ids: the prompt's ids with a choice's first chunk, and the
        ids each chunk adds."""
        if not self._meta.return_token_ids:
            return item
        prompt_ids = self._prompt_ids.pop(index, None)
        if prompt_ids is not None:
            item["prompt_token_ids"] = prompt_ids
        item["token_ids"] = list(new_ids)
        return item

    def on_end(self) -> list[dict]:
        if not self._include_usage:
            return []
        chunk = self._meta.envelope([])
        chunk["usage"] = self._usage()
        return [chunk]

    def _usage(self) -> dict:
        return usage_body(sum(self._prompt_tokens.values()), sum(self._completion_tokens.values()))

    def _chunk(self, choice: dict) -> dict:
        chunk = self._meta.envelope([choice])
        if self._continuous:
            chunk["usage"] = self._usage()
        return chunk


def _stream_choice(index: int, text: str, logprobs: dict | None, finish: str | None) -> dict:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
