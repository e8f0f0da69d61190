"""An asyncio TCP proxy that forwards through an emulated link: the link emulator's core."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from molink.netem.pipe import DirectionPipe, LinkDirection, set_nodelay
from molink.netem.spec import LinkSpec
from molink.netem.together import run_together

logger = logging.getLogger(__name__)

_CLOSE_TIMEOUT_S = 1.0


@dataclass(frozen=True)
class LinkStats:
    """Bytes through the link ("up": client to target, "down": target to client).

    ``bytes_*`` were delivered; ``buffered_*`` are held by the emulator (queued or in flight).
    """

    bytes_up: int
    bytes_down: int
    buffered_up: int
    buffered_down: int
    connections_total: int
    connections_open: int


class LinkProxy:
    """Listens on ``listen_host:listen_port`` and forwards each connection to the target.

    Runs on the caller's event loop; see ``LinkEmulator`` for a background-thread wrapper.
    The bytes are passed through unchanged, so any protocol over TCP (HTTP/2, gRPC) works.
    Connection set-up is not delayed: only data sees the link.
    """

    def __init__(
        self,
        listen_host: str,
        listen_port: int,
        target_host: str,
        target_port: int,
        up: LinkSpec,
        down: LinkSpec | None = None,
        connect_timeout_s: float = 5.0,
    ) -> None:
        self._listen = (listen_host, listen_port)
        self._target = (target_host, target_port)
        self._up = LinkDirection("up", up)
        self._down = LinkDirection("down", down if down is not None else up)
        self._connect_timeout_s = connect_timeout_s
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self._connections_total = 0
        self._port: int | None = None

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError("the proxy is not listening yet")
        return self._port

    @property
    def up(self) -> LinkSpec:
        return self._up.spec

    @property
    def down(self) -> LinkSpec:
        return self._down.spec

    def stats(self) -> LinkStats:
        return LinkStats(
            bytes_up=self._up.bytes_delivered,
            bytes_down=self._down.bytes_delivered,
            buffered_up=self._up.bytes_buffered,
            buffered_down=self._down.bytes_buffered,
            connections_total=self._connections_total,
            connections_open=len(self._conns),
        )

    async def start(self) -> None:
        host, port = self._listen
        # The stream buffer must hold a whole chunk, or reads come back short and the link
        # pays per-chunk overhead on smaller pieces than it schedules.
        self._server = await asyncio.start_server(
            self._on_client, host, port, limit=self._up.spec.chunk_bytes
        )
        self._port = self._server.sockets[0].getsockname()[1]
        logger.info(
            "netem listening on %s:%d -> %s:%d (up: %s; down: %s)",
            host,
            self._port,
            *self._target,
            self._up.spec.describe(),
            self._down.spec.describe(),
        )

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Stop listening and close every open connection (peers see end of stream)."""
        if self._server is not None:
            self._server.close()
        conns = list(self._conns)
        for task in conns:
            task.cancel()
        if conns:
            _, pending = await asyncio.wait(conns, timeout=timeout_s)
            if pending:
                logger.warning("netem: %d connections did not close in time", len(pending))
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout_s)
            self._server = None

    async def __aenter__(self) -> LinkProxy:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._connections_total += 1
        peer = writer.get_extra_info("peername")
        try:
            await self._serve(peer, reader, writer)
        except asyncio.CancelledError:
            # Only aclose() cancels connections, and it has already had its effect; a task
            # that ends cancelled would make the stream machinery log a spurious error.
            pass
        finally:
            self._conns.discard(task)

    async def _serve(
        self, peer: object, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        set_nodelay(writer)
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                up_reader, up_writer = await asyncio.wait_for(
                    asyncio.open_connection(*self._target, limit=self._down.spec.chunk_bytes),
                    self._connect_timeout_s,
                )
            except (OSError, asyncio.TimeoutError) as exc:
                logger.warning("netem: cannot reach target %s:%d: %s", *self._target, exc)
                return
            set_nodelay(up_writer)
            logger.debug("netem: connection from %s", peer)
            pipes = (
                DirectionPipe(self._up, reader, up_writer),
                DirectionPipe(self._down, up_reader, writer),
            )
            try:
                await _run_both(pipes)
            except (OSError, EOFError) as exc:
                # A reset on either side ends the emulated connection: reset the other too.
                logger.debug("netem: connection from %s ended: %s", peer, exc)
                for w in (writer, up_writer):
                    w.transport.abort()
        finally:
            await asyncio.gather(*(_close(w) for w in (writer, up_writer) if w is not None))


async def _run_both(pipes: tuple[DirectionPipe, DirectionPipe]) -> None:
    """Run both directions; the first error stops the other one."""
    await run_together(*(p.run() for p in pipes))


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError, asyncio.CancelledError):
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT_S)
