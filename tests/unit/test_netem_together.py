"""Both sides of a link end together: the first failure cancels the others."""

from __future__ import annotations

import asyncio

import pytest

from molink.netem.together import run_together


def test_all_finish_when_none_fails() -> None:
    done: list[str] = []

    async def side(name: str) -> None:
        await asyncio.sleep(0)
        done.append(name)

    asyncio.run(run_together(side("read"), side("write")))
    assert sorted(done) == ["read", "write"]


def test_the_first_error_cancels_the_rest_and_is_raised() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def broken() -> None:
        raise ConnectionResetError("peer reset")

    async def main() -> None:
        with pytest.raises(ConnectionResetError, match="peer reset"):
            await run_together(forever(), broken())
        assert cancelled.is_set()

    asyncio.run(main())
