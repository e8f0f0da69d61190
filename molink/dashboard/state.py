"""What the dashboard's routes share: the swarm provider, the chart history and the routes
that served recent requests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi import Request

from molink.dashboard.history import MetricsHistory
from molink.dashboard.served import ServedRoutes
from molink.dashboard.snapshot import SwarmProvider


@dataclass(frozen=True)
class DashboardState:
    provider: SwarmProvider
    history: MetricsHistory
    closing: Callable[[], str | None]  # why the server is stopping; None while it serves
    served: ServedRoutes


def get_state(request: Request) -> DashboardState:
    return request.app.state.dashboard
