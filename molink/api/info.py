"""Routes that generate nothing: models, health, metrics, version, tokenize, detokenize."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

import molink
from molink.api.chat_render import render_chat_prompt
from molink.api.context import ServerContext, get_context
from molink.api.errors import APIError, error_response
from molink.api.schemas import DetokenizeRequest, TokenizeRequest

router = APIRouter()

PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _model_card(ctx: ServerContext, name: str) -> dict:
    return {
        "id": name,
        "object": "model",
        "created": ctx.created,
        "owned_by": "molink",
        "root": ctx.engine.model_name,
        "parent": None,
        "max_model_len": ctx.engine.max_model_len,
        "permission": [],
    }


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    ctx = get_context(request)
    cards = [_model_card(ctx, name) for name in ctx.served_model_names]
    return JSONResponse({"object": "list", "data": cards})


@router.get("/v1/models/{model:path}")
async def retrieve_model(model: str, request: Request) -> JSONResponse:
    ctx = get_context(request)
    return JSONResponse(_model_card(ctx, ctx.resolve_model(model)))


@router.get("/health")
async def health(request: Request) -> Response:
    """200 with an empty body when requests can be served (as vLLM), else 503 and why."""
    ctx = get_context(request)
    try:
        ctx.ensure_ready()
    except APIError as exc:
        return error_response(exc)
    return Response(status_code=200)


@router.get("/ping")
async def ping(request: Request) -> Response:
    """vLLM's (and SageMaker's) liveness probe: the same answer as /health."""
    return await health(request)


@router.post("/ping")
async def ping_post(request: Request) -> Response:
    """/ping by POST, as SageMaker sends it (its own route: one operation id each)."""
    return await health(request)


@router.get("/load")
async def load(request: Request) -> JSONResponse:
    """vLLM's load report: HTTP requests being served now."""
    return JSONResponse({"server_load": get_context(request).num_active_requests})


@router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": molink.__version__})


@router.get("/metrics")
async def metrics(request: Request) -> PlainTextResponse:
    text = get_context(request).metrics.render()
    return PlainTextResponse(text, media_type=PROMETHEUS_CONTENT_TYPE)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    ctx = get_context(request)
    ctx.resolve_model(body.model)
    tokenizer = ctx.engine.tokenizer
    if body.messages is not None:
        if body.prompt is not None:
            raise APIError(400, "give either prompt or messages, not both", "messages")
        token_ids = await asyncio.to_thread(render_chat_prompt, ctx, body.messages, body)
    elif body.prompt is not None:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        ctx.check_prompt_size(len(body.prompt), "prompt")
        token_ids = await asyncio.to_thread(tokenizer.encode, body.prompt, add_special)
    else:
        raise APIError(400, "prompt or messages is required", "prompt")
    token_strs = tokenizer.convert_ids_to_tokens(token_ids) if body.return_token_strs else None
    return JSONResponse(
        {
            "count": len(token_ids),
            "max_model_len": ctx.engine.max_model_len,
            "tokens": token_ids,
            "token_strs": token_strs,
        }
    )


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> JSONResponse:
    ctx = get_context(request)
    ctx.resolve_model(body.model)
    tokenizer = ctx.engine.tokenizer
    bad = [t for t in body.tokens if not 0 <= t < tokenizer.vocab_size]
    if bad:
        raise APIError(
            400,
            f"token id {bad[0]} is outside the vocabulary [0, {tokenizer.vocab_size})",
            "tokens",
        )
    # Off the event loop, as tokenizing is: a long list would stall every other request.
    text = await asyncio.to_thread(tokenizer.decode, body.tokens, skip_special_tokens=False)
    return JSONResponse({"prompt": text})
