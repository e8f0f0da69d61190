"""API-key check for every route but the probes (health, ping, version).

Metrics and the dashboard need the key when one is set: they show the swarm's nodes,
addresses and load, which is not for anyone who can reach the port.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable

from starlette._utils import get_route_path
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from molink.api.errors import APIError, error_response

# The probes: a load balancer or orchestrator calls them without the key.
OPEN_PATHS = frozenset({"/health", "/ping", "/version"})


def _digest(value: str) -> bytes:
    # Hashing first makes the comparison constant-time in the key's length as well.
    return hashlib.sha256(value.encode("utf-8")).digest()


def bearer_token(headers: Headers) -> str | None:
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip()


class BearerAuthMiddleware:
    """Answers 401 unless ``Authorization: Bearer <api key>`` matches.

    A plain ASGI middleware (not Starlette's BaseHTTPMiddleware), so streamed responses pass
    through untouched and the check runs before the body is read.
    """

    def __init__(
        self, app: ASGIApp, api_key: str, public: Callable[[str], bool] | None = None
    ) -> None:
        self._app = app
        self._key_digest = _digest(api_key)
        # Paths that carry no data (e.g. the dashboard's page shells), open like the probes.
        self._public = public or (lambda path: False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        # The route's own path: behind --root-path the server's path carries the prefix.
        # Starlette's own function, so the check sees exactly the path routing matches.
        path = get_route_path(scope)
        if path in OPEN_PATHS or self._public(path) or self._authorized(scope):
            await self._app(scope, receive, send)
            return
        response = error_response(
            APIError(401, "invalid or missing API key", None, "invalid_api_key")
        )
        await response(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        token = bearer_token(Headers(scope=scope))
        if token is None:
            return False
        return hmac.compare_digest(_digest(token), self._key_digest)
