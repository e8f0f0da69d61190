"""Which route served each request: the nodes that computed its last tokens.

A request keeps to one route unless a node on it fails and the request moves; so the
route that served an answer is known only when it finishes. Finished requests are kept
here (the latest ``MAX_KEPT``), for ``GET /dashboard/api/served/{id}`` and for the route
header of responses sent after the request finished (every non-streamed one).
"""

from __future__ import annotations

import contextvars
import threading
from collections import OrderedDict
from dataclasses import dataclass

from molink.outputs import RequestOutput

MAX_KEPT = 1024


@dataclass
class RouteNote:
    """Filled while one HTTP request runs: the route its finished engine requests took."""

    route: tuple[str, ...] = ()


# Set by the route header middleware for each generation request; the task that reads the
# engine's outputs for that request (the endpoint, or its streaming body) inherits it.
CURRENT_NOTE: contextvars.ContextVar[RouteNote | None] = contextvars.ContextVar(
    "molink_route_note", default=None
)


class ServedRoutes:
    """Thread-safe, bounded: request id -> node ids, head first."""

    def __init__(self, max_kept: int = MAX_KEPT) -> None:
        self._max_kept = max_kept
        self._lock = threading.Lock()
        self._routes: OrderedDict[str, tuple[str, ...]] = OrderedDict()

    def observe(self, output: RequestOutput) -> None:
        """Called with every finished request."""
        if not output.route:
            return
        note = CURRENT_NOTE.get()
        if note is not None:
            note.route = output.route
        with self._lock:
            self._routes[output.request_id] = output.route
            self._routes.move_to_end(output.request_id)
            while len(self._routes) > self._max_kept:
                self._routes.popitem(last=False)

    def get(self, request_id: str) -> tuple[str, ...] | None:
        with self._lock:
            return self._routes.get(request_id)
