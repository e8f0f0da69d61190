"""The FastAPI application: OpenAI routes, vLLM's extras, metrics and health."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from fastapi import FastAPI

import molink
from molink.api import chat, completions, generate, info
from molink.api.auth import BearerAuthMiddleware
from molink.api.context import ChatOptions, ServerContext
from molink.api.cors import CorsPolicy, install_cors
from molink.api.errors import install_error_handlers
from molink.api.metrics import MetricSource, ServerMetrics
from molink.api.middleware import (
    CatchAllMiddleware,
    LoadCounterMiddleware,
    RequestIdMiddleware,
)
from molink.dashboard import SwarmProvider, install_dashboard, is_public, provider_for
from molink.engine.protocol import EngineClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ApiConfig:
    """How the HTTP layer presents one engine."""

    served_model_names: tuple[str, ...] = ()  # empty: the engine's model_name
    api_key: str | None = None  # None: no authentication
    metric_sources: tuple[MetricSource, ...] = ()  # extra Prometheus lines, e.g. link bandwidth
    swarm: SwarmProvider | None = None  # what /dashboard shows; None: derived from the engine
    chat: ChatOptions = field(default_factory=ChatOptions)
    cors: CorsPolicy | None = None  # None: no cross-origin access
    disable_docs: bool = False  # --disable-fastapi-docs: no /docs, /redoc, /openapi.json
    request_id_headers: bool = False  # --enable-request-id-headers


def create_app(engine: EngineClient, config: ApiConfig | None = None) -> FastAPI:
    """Builds the app. ``app.state.molink`` is its ServerContext (metrics, running streams)."""
    config = config or ApiConfig()
    names = config.served_model_names or (engine.model_name,)
    metrics = ServerMetrics(names[0], engine.stats)
    for source in config.metric_sources:
        metrics.add_source(source)
    context = ServerContext(
        engine=engine,
        served_model_names=tuple(names),
        metrics=metrics,
        api_key=config.api_key,
        chat=config.chat,
    )

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        # Normally the server has already ended the streams before it stops; this is the
        # fallback for servers that go straight to the lifespan shutdown.
        context.streams.close_all("stop requested")

    docs = {"docs_url": None, "redoc_url": None, "openapi_url": None}
    app = FastAPI(
        title="MoLink",
        version=molink.__version__,
        lifespan=lifespan,
        **(docs if config.disable_docs else {}),
    )
    app.state.molink = context
    install_error_handlers(app)
    for module in (info, completions, chat, generate):
        app.include_router(module.router)
    swarm = config.swarm or provider_for(engine)

    def closing() -> str | None:
        return context.streams.closing_reason

    context.finished_observers.append(install_dashboard(app, swarm, engine.stats, closing))
    if config.api_key:
        app.add_middleware(BearerAuthMiddleware, api_key=config.api_key, public=is_public)
    app.add_middleware(LoadCounterMiddleware, context=context)
    if config.request_id_headers:
        app.add_middleware(RequestIdMiddleware)
    if config.cors is not None:
        install_cors(app, config.cors)
    # Outermost of the app's own middleware: an unexpected error becomes a 500 here, so
    # Starlette's last-resort handler never re-raises it and the connection stays usable.
    app.add_middleware(CatchAllMiddleware)
    return app


def server_context(app: FastAPI) -> ServerContext:
    return app.state.molink
