"""``X-MoLink-Route``: the nodes (head first, comma-separated ids) that served a request,
on every generation response, so that clients (the playground among them) can show it.

A response sent after its request finished (any non-streamed one) names the route that
computed the last tokens; a stream's headers leave before that, so they name the
provider's route (the head's pipeline), and ``GET /dashboard/api/served/{id}`` tells the route
that served it once it is done (a request moves to another route when a node fails).

A plain ASGI middleware: it touches only the response's start message, so streamed bodies
pass through untouched.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from molink.dashboard.served import CURRENT_NOTE, RouteNote
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
        note = RouteNote()
        token = CURRENT_NOTE.set(note)

        async def send_with_route(message: Message) -> None:
            if message["type"] == "http.response.start":
                route = ",".join(note.route or self._provider.route())
                if route:
                    headers = list(message.get("headers", []))
                    headers.append((ROUTE_HEADER.encode(), route.encode("latin-1", "replace")))
                    message = {**message, "headers": headers}
            await send(message)

        try:
            await self._app(scope, receive, send_with_route)
        finally:
            CURRENT_NOTE.reset(token)
