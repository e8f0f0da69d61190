"""The link emulator on a background thread, for callers that are not on an event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from types import TracebackType

from molink.netem.loop import new_event_loop
from molink.netem.proxy import LinkProxy, LinkStats
from molink.netem.spec import LinkSpec

logger = logging.getLogger(__name__)


class LinkEmulator:
    """A ``LinkProxy`` running its own event loop on a daemon thread.

    ``up`` shapes client-to-target bytes, ``down`` target-to-client (defaults to ``up``).
    ``listen_port=0`` picks a free port; read it from ``port`` after ``start()``.
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
        self._proxy = LinkProxy(
            listen_host, listen_port, target_host, target_port, up, down, connect_timeout_s
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None

    @property
    def port(self) -> int:
        return self._proxy.port

    @property
    def up(self) -> LinkSpec:
        return self._proxy.up

    @property
    def down(self) -> LinkSpec:
        return self._proxy.down

    @property
    def bytes_up(self) -> int:
        return self._proxy.stats().bytes_up

    @property
    def bytes_down(self) -> int:
        return self._proxy.stats().bytes_down

    def stats(self) -> LinkStats:
        # Plain int reads; a snapshot taken off the loop thread may be a chunk behind.
        return self._proxy.stats()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, timeout_s: float = 10.0) -> LinkEmulator:
        """Start listening; return once the port is bound (or raise what prevented it)."""
        if self._thread is not None:
            raise RuntimeError("LinkEmulator already started")
        self._thread = threading.Thread(target=self._run, name="netem", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s):
            raise TimeoutError(f"link emulator did not start within {timeout_s} s")
        if self._startup_error is not None:
            self._thread.join(timeout_s)
            self._thread = None
            raise self._startup_error
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        """Close all connections and the listener, then end the thread. Safe to call twice."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        fut = asyncio.run_coroutine_threadsafe(self._proxy.aclose(timeout_s / 2), loop)
        try:
            fut.result(timeout_s)
        except concurrent.futures.TimeoutError:
            logger.warning("netem: close did not finish within %.1f s", timeout_s)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout_s)
        if thread.is_alive():
            raise TimeoutError(f"link emulator thread did not end within {timeout_s} s")
        self._thread = None

    def __enter__(self) -> LinkEmulator:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _run(self) -> None:
        loop = new_event_loop()
        self._loop = loop
        try:
            try:
                loop.run_until_complete(self._proxy.start())
            except BaseException as exc:  # handed to the thread that called start()
                self._startup_error = exc
                return
            finally:
                self._ready.set()
            loop.run_forever()
            # Reached after stop(); also covers a loop stopped without aclose().
            loop.run_until_complete(self._proxy.aclose(1.0))
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
