"""The browser side of a head: /dashboard (the swarm, live) and /playground (a chat).

``install_dashboard`` adds both to the API's app; the swarm comes from a
``SwarmProvider`` (molink.dashboard.snapshot), chosen for the engine by ``provider_for``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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

logger = logging.getLogger(__name__)

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
    """Samples until cancelled. A failed sample (the engine's or the swarm's counters
    raised) is logged, once until a sample succeeds again, and skipped: ending the task
    would freeze the charts for the rest of the server's life."""
    failing = False
    while True:
        try:
            history.sample_if_due()
            failing = False
        except Exception:
            if not failing:
                logger.warning("taking a dashboard chart sample failed", exc_info=True)
            failing = True
        await asyncio.sleep(SAMPLE_INTERVAL_S)
