"""Errors of the scheduler."""

from __future__ import annotations

from molink.errors import MolinkError


class SchedulerIntegrityError(MolinkError):
    """An invariant of the scheduler's queues or counters does not hold."""
