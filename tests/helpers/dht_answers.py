"""Stand-ins for hivemind's DHT answer futures, for fakes of its DHT in unit tests."""

from __future__ import annotations

import concurrent.futures
from typing import Any


def answered(value: Any, return_future: bool) -> Any:
    """``value`` as hivemind's DHT returns it: itself, or a future already holding it."""
    if not return_future:
        return value
    future: concurrent.futures.Future[Any] = concurrent.futures.Future()
    future.set_result(value)
    return future
