"""The dashboard's and playground's HTTP routes.

Pages and their scripts carry no data and are served to anyone (a browser cannot send an
API key when it opens a page); everything under /dashboard/api needs the key when one is
set, and the pages ask for it. Live data goes out as server-sent events: plain HTTP that a
page reads with fetch (which, unlike EventSource, can send the Authorization header).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from molink.dashboard.state import DashboardState, get_state

PUBLIC_PATHS = frozenset({"/dashboard", "/playground"})
STATIC_PREFIX = "/dashboard/static/"
EVENT_INTERVAL_S = 1.0
_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
# No page loads anything from elsewhere, and model output never runs as markup.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or (path.startswith(STATIC_PREFIX) and ".." not in path)


def _asset(name: str) -> Response:
    suffix = name[name.rfind(".") :] if "." in name else ""
    files = resources.files("molink.dashboard") / "static"
    if "/" in name or "\\" in name or suffix not in _CONTENT_TYPES:
        return JSONResponse({"error": {"message": f"no such asset: {name}"}}, status_code=404)
    target = files / name
    if not target.is_file():
        return JSONResponse({"error": {"message": f"no such asset: {name}"}}, status_code=404)
    return Response(
        target.read_bytes(), media_type=_CONTENT_TYPES[suffix], headers=_SECURITY_HEADERS
    )


@router.get("/dashboard")
async def dashboard_page() -> Response:
    return _asset("dashboard.html")


@router.get("/playground")
async def playground_page() -> Response:
    return _asset("playground.html")


@router.get(STATIC_PREFIX + "{name}")
async def static_asset(name: str) -> Response:
    return _asset(name)


@router.get("/dashboard/api/snapshot")
async def snapshot(request: Request) -> JSONResponse:
    state = get_state(request)
    state.history.sample_if_due()
    return JSONResponse(_event(state, since=0.0))


@router.get("/dashboard/api/served/{request_id}")
async def served_route(request: Request, request_id: str) -> JSONResponse:
    """The route (node ids, head first) that computed a finished request's last tokens."""
    route = get_state(request).served.get(request_id)
    if route is None:
        message = f"no finished request {request_id!r} is known here (the latest are kept)"
        return JSONResponse({"error": {"message": message}}, status_code=404)
    return JSONResponse({"id": request_id, "route": list(route)})


@router.get("/dashboard/api/events")
async def events(request: Request) -> StreamingResponse:
    state = get_state(request)
    return StreamingResponse(
        _event_stream(state, request),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _event(state: DashboardState, since: float) -> dict:
    return {
        "snapshot": state.provider.snapshot().to_json(),
        "history": state.history.points(since),
    }


async def _event_stream(state: DashboardState, request: Request) -> AsyncIterator[str]:
    """One event a second: the snapshot and the chart points the page has not had yet.
    Ends when the client goes away or the server stops."""
    since = 0.0
    while state.closing() is None and not await request.is_disconnected():
        state.history.sample_if_due()
        event = _event(state, since)
        if event["history"]:
            since = event["history"][-1]["t"]
        yield f"event: swarm\ndata: {json.dumps(event, allow_nan=False)}\n\n"
        await asyncio.sleep(EVENT_INTERVAL_S)
