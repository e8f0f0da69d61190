"""Moving bytes of one connection's direction through the link model, on an asyncio loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections import deque

from molink.netem.shaper import DelayLine, RateClock
from molink.netem.spec import LinkSpec
from molink.netem.together import run_together

logger = logging.getLogger(__name__)


class LinkDirection:
    """State one direction of the link shares across all connections: its clock and counters.

    Connections share the clock because they share the emulated wire: two bulk transfers
    each get about half the rate, as they would on a real bottleneck. Readers waiting for
    room in the queue are served first come, first served; without that, the reader that
    just took a chunk re-arms its timer first and wins every tie, starving the others.
    """

    def __init__(self, name: str, spec: LinkSpec) -> None:
        self.name = name
        self.spec = spec
        self.clock = RateClock(spec)
        self.bytes_delivered = 0
        self.bytes_buffered = 0  # read from senders, not yet delivered, over all connections
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    async def wait_turn(self) -> None:
        """Return when the bottleneck queue has room and no earlier reader is waiting."""
        loop = asyncio.get_running_loop()
        if not self._waiters and self.clock.has_room(loop.time()):
            return
        fut: asyncio.Future[None] = loop.create_future()
        self._waiters.append(fut)
        self._arm(loop)
        try:
            await fut
        except asyncio.CancelledError:
            if fut in self._waiters:
                self._waiters.remove(fut)
            raise

    def _arm(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._timer is None and self._waiters:
            self._timer = loop.call_at(self.clock.ready_at(), self._release, loop)

    def _release(self, loop: asyncio.AbstractEventLoop) -> None:
        # One reader per wake-up: it runs (and takes its chunk) before the re-armed timer
        # fires, so the next reader sees the queue as that chunk left it.
        self._timer = None
        if self.clock.has_room(loop.time()):
            while self._waiters:
                fut = self._waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
                    break
        self._arm(loop)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def sleep_until(deadline: float) -> None:
    """Sleep until the loop clock reaches ``deadline`` (an absolute time, not a duration)."""
    loop = asyncio.get_running_loop()
    if deadline <= loop.time():
        return
    fut: asyncio.Future[None] = loop.create_future()
    handle = loop.call_at(deadline, _resolve, fut)
    try:
        await fut
    finally:
        handle.cancel()


def set_nodelay(writer: asyncio.StreamWriter) -> None:
    """Disable Nagle so that small messages leave as soon as the link model releases them."""
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class DirectionPipe:
    """Read from one socket, hold each chunk on a delay line, write it out when it is due.

    The read side stops reading (and so lets TCP flow control push back on the sender) while
    the shared bottleneck queue is full or this connection holds too many bytes; the write
    side waits on the receiver's drain, so a slow receiver backs up to the sender as well.
    """

    def __init__(
        self, link: LinkDirection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self._link = link
        self._reader = reader
        self._writer = writer
        self._line = DelayLine(link.spec.delay_s)
        self._has_data = asyncio.Event()
        self._has_room = asyncio.Event()

    async def run(self) -> None:
        """Pump until the sender's end of stream has been delivered; raise on socket errors."""
        try:
            await run_together(self._read_side(), self._write_side())
        finally:
            # Whatever is still on the line dies with the connection.
            self._link.bytes_buffered -= self._line.buffered_bytes

    async def _wait_for_room(self) -> None:
        limit = self._link.spec.buffer_limit_bytes
        while self._line.buffered_bytes >= limit:
            self._has_room.clear()
            await self._has_room.wait()
        await self._link.wait_turn()

    async def _read_side(self) -> None:
        loop = asyncio.get_running_loop()
        chunk = self._link.spec.chunk_bytes
        while True:
            await self._wait_for_room()
            data = await self._reader.read(chunk)
            now = loop.time()
            if not data:
                self._line.push_eof(now)
                self._has_data.set()
                return
            self._line.push(self._link.clock.schedule(len(data), now), data)
            self._link.bytes_buffered += len(data)
            self._has_data.set()

    async def _write_side(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due = self._line.next_due()
            if due is None:
                self._has_data.clear()
                await self._has_data.wait()
                continue
            if due > loop.time():
                await sleep_until(due)
                continue
            delivery = self._line.pop_due(loop.time())
            if delivery.chunks:
                # Counted first: a reader on another thread that has seen the bytes arrive
                # must also see them counted.
                self._link.bytes_delivered += delivery.nbytes
                self._link.bytes_buffered -= delivery.nbytes
                self._writer.write(b"".join(delivery.chunks))
                self._has_room.set()
                await self._writer.drain()
            if delivery.eof:
                self._deliver_eof()
                return

    def _deliver_eof(self) -> None:
        # A half-close must pass through: the peer may still answer after seeing EOF.
        if self._writer.is_closing():
            return
        if self._writer.can_write_eof():
            with contextlib.suppress(OSError):
                self._writer.write_eof()
