"""``X-MoLink-Route``: the nodes (head first, comma-separated ids) that served a request,
on every generation response, so that clients (the playground among them) can show it.

A plain ASGI middleware: it touches only the response's start message, so streamed bodies
pass through untouched.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from molink.dashboard.snapshot import SwarmProvider

ROUTE_HEADER = "x-molink-route"
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions", "/generate"})


class RouteHeaderMiddleware:
    def __init__(self, app: ASGIApp, provider: SwarmProvider) -> None:
        self._app = app
        self._provider = provider

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            await self._app(scope, receive, send)
            return
        # The route a request takes is fixed when it starts.
        route = ",".join(self._provider.route())

        async def send_with_route(message: Message) -> None:
            if message["type"] == "http.response.start" and route:
                headers = list(message.get("headers", []))
                headers.append((ROUTE_HEADER.encode(), route.encode("latin-1", "replace")))
                message = {**message, "headers": headers}
            await send(message)

        await self._app(scope, receive, send_with_route)
