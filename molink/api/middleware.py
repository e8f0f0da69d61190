"""ASGI middleware: a 500 that keeps the connection, the count of requests in flight, and
X-Request-Id headers."""

from __future__ import annotations

import logging
import uuid

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from molink.api.context import ServerContext
from molink.api.errors import error_response, to_api_error

logger = logging.getLogger(__name__)


class CatchAllMiddleware:
    """Answers any exception that escaped the routes with a JSON 500.

    Starlette's own outermost handler also answers 500, but then re-raises, and uvicorn
    closes the keep-alive connection; a client's next request on it would fail.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            if started:  # a streamed body failed midway: nothing more can be said
                raise
            logger.exception("unhandled error while serving a request", exc_info=exc)
            await error_response(to_api_error(exc))(scope, receive, send)


class LoadCounterMiddleware:
    """Counts HTTP requests being served, for vLLM's /load."""

    def __init__(self, app: ASGIApp, context: ServerContext) -> None:
        self.app = app
        self._context = context

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._context.num_active_requests += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self._context.num_active_requests -= 1


class RequestIdMiddleware:
    """vLLM's --enable-request-id-headers: every response carries X-Request-Id, the
    request's own when it sent one, else a new id."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        sent = dict(scope.get("headers") or []).get(b"x-request-id")
        request_id = sent or uuid.uuid4().hex.encode()

        async def with_header(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"x-request-id"]
                message = {**message, "headers": [*headers, (b"x-request-id", request_id)]}
            await send(message)

        await self.app(scope, receive, with_header)
