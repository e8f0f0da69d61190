"""The browser side of a head: /dashboard (the swarm, live) and /playground (a chat).

``install_dashboard`` adds both to the API's app; the swarm comes from a
``SwarmProvider`` (molink.dashboard.snapshot), chosen for the engine by ``provider_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from fastapi import FastAPI

from molink.dashboard.history import SAMPLE_INTERVAL_S, MetricsHistory
from molink.dashboard.providers import provider_for
from molink.dashboard.route_header import RouteHeaderMiddleware
from molink.dashboard.routes import is_public, router
from molink.dashboard.served import ServedRoutes
from molink.dashboard.snapshot import SwarmProvider, SwarmSnapshot
from molink.dashboard.state import DashboardState
from molink.engine.protocol import EngineStats
from molink.outputs import RequestOutput

__all__ = ["SwarmProvider", "SwarmSnapshot", "install_dashboard", "is_public", "provider_for"]


def install_dashboard(
    app: FastAPI,
    provider: SwarmProvider,
    stats: Callable[[], EngineStats],
    closing: Callable[[], str | None],
) -> Callable[[RequestOutput], None]:
    """Adds the routes, the route header and a sampler that runs while the app does.
    Returns what the API must call with every finished request (for the latency charts
    and the routes that served them)."""

    def recovery() -> tuple[int, int]:
        snapshot = provider.snapshot()
        return snapshot.failovers_total, snapshot.replays_total

    history = MetricsHistory(stats, recovery)
    served = ServedRoutes()
    app.state.dashboard = DashboardState(provider, history, closing, served)
    app.include_router(router)
    app.add_middleware(RouteHeaderMiddleware, provider=provider)
    _sample_while_running(app, history)

    def observe(output: RequestOutput) -> None:
        history.observe(output)
        served.observe(output)

    return observe


def _sample_while_running(app: FastAPI, history: MetricsHistory) -> None:
    """Charts cover the last minutes even when nobody watched them."""
    inner = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(application: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_sample_forever(history))
        try:
            async with inner(application) as state:
                yield state
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    app.router.lifespan_context = lifespan


async def _sample_forever(history: MetricsHistory) -> None:
    while True:
        history.sample_if_due()
        await asyncio.sleep(SAMPLE_INTERVAL_S)
