"""What the engine loop needs from a head that routes its plans over several routes.

A sequence's KV lives on the nodes of one route, so every plan must keep to one route.
Before filling a micro-batch slot the engine asks for the route choices in order; for each
it schedules a plan with the choice's filter and takes the first plan that is not empty,
then binds it to that choice so that the executor sends it that way.
"""

from __future__ import annotations

from typing import Protocol

from molink.step import StepPlan


class RouteChoice(Protocol):
    def accepts(self, seq_id: int, num_tokens: int) -> bool:
        """May this sequence (holding ``num_tokens`` tokens after the step) join a plan on
        this route? Sequences already on another route may not; new ones may if this is
        where the routing rule sends them."""


class PlanRouter(Protocol):
    def choices(self) -> list[RouteChoice]:
        """The routes to try for the next plan, in order (empty: no route exists)."""

    def bind(self, plan: StepPlan, choice: RouteChoice) -> None:
        """``plan`` was scheduled with ``choice``: its new sequences are now on that route."""
