"""When each request of a run is sent, as offsets in seconds from the start of the run."""

from __future__ import annotations

import math
import random


class ArrivalError(ValueError):
    """An arrival rate that cannot be used."""


def parse_rate(text: str) -> float:
    """Requests per second from the command line; "inf" means all at once."""
    if text.strip().lower() in ("inf", "infinity", "max"):
        return math.inf
    try:
        rate = float(text)
    except ValueError as exc:
        raise ArrivalError(f"rate {text!r} is not a number or 'inf'") from exc
    check_rate(rate)
    return rate


def check_rate(rate: float) -> None:
    if math.isnan(rate) or rate <= 0:
        raise ArrivalError(f"rate must be > 0 requests/s (or inf), got {rate}")


def arrival_offsets(num_requests: int, rate: float, seed: int = 0) -> list[float]:
    """Send offsets for ``num_requests`` requests.

    ``rate`` = inf: every request at 0 (a closed batch; a concurrency cap then decides how
    many are in flight). Otherwise a Poisson process: gaps are exponential with mean
    1/rate, seeded, and the first request goes at 0 so a run does not start with idle time.
    """
    check_rate(rate)
    if num_requests < 0:
        raise ArrivalError(f"num_requests must be >= 0, got {num_requests}")
    if math.isinf(rate):
        return [0.0] * num_requests
    rng = random.Random(seed)
    offsets = []
    now = 0.0
    for index in range(num_requests):
        if index > 0:
            now += rng.expovariate(rate)
        offsets.append(now)
    return offsets
