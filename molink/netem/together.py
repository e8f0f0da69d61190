"""Running coroutines as one unit: all finish, or the first failure stops the rest.

Both ends of a pipe, and both directions of a proxied connection, live and die together:
a socket error on one side must not leave the other pumping into a dead connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any


async def run_together(*coroutines: Coroutine[Any, Any, None]) -> None:
    """Await every coroutine; if one raises, cancel the others and raise its error."""
    tasks = [asyncio.ensure_future(c) for c in coroutines]
    try:
        # Returns once all are done, or as soon as one raises.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
