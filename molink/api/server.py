"""Running the app under uvicorn with a graceful stop.

On SIGINT/SIGTERM the server first ends every running stream with an error event (so
clients learn why it stopped and the engine frees their KV blocks), then lets uvicorn close
connections and release the port. The signal is not re-raised afterwards, so the process
exits with status 0.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Generator
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from molink.api.app import server_context
from molink.api.runner import StreamRegistry

logger = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_SECONDS = 5.0
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class GracefulServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, streams: StreamRegistry) -> None:
        super().__init__(config)
        self._streams = streams

    async def shutdown(self, sockets: list | None = None) -> None:
        ended = self._streams.close_all("stop requested")
        if ended:
            logger.info("ended %d running request(s) before stopping", ended)
        await super().shutdown(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn's own version re-raises the signal after shutdown, which would turn a clean
        # stop into exit status 130/143.
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def make_server(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str = "info",
    graceful_seconds: float = GRACEFUL_SHUTDOWN_SECONDS,
    tls: HttpsFiles | None = None,
    root_path: str = "",
    access_log: bool = True,
) -> GracefulServer:
    """``root_path``: the prefix a proxy serves the API under (--root-path)."""
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level.lower(),
        timeout_graceful_shutdown=int(max(1, graceful_seconds)),
        timeout_keep_alive=5,
        # uvicorn's own TLS (Python's ssl module), as vLLM's server does.
        ssl_keyfile=tls.keyfile if tls else None,
        ssl_certfile=tls.certfile if tls else None,
        ssl_ca_certs=tls.ca_certs if tls else None,
        ssl_cert_reqs=tls.cert_reqs if tls else 0,
        root_path=root_path,
        access_log=access_log,
    )
    return GracefulServer(config, server_context(app).streams)


@dataclass(frozen=True)
class HttpsFiles:
    """A PEM private key and its certificate chain, for serving HTTPS; with ``ca_certs`` and
    ``cert_reqs`` (ssl.CERT_OPTIONAL or CERT_REQUIRED) clients show certificates it signed."""

    keyfile: str
    certfile: str
    ca_certs: str | None = None
    cert_reqs: int = 0  # ssl.CERT_NONE


async def serve_app(
    app: FastAPI,
    host: str,
    port: int,
    log_level: str = "info",
    tls: HttpsFiles | None = None,
    root_path: str = "",
    access_log: bool = True,
) -> GracefulServer:
    """Serves until stopped by a signal (or ``server.should_exit``); HTTPS with ``tls``."""
    server = make_server(
        app, host, port, log_level, tls=tls, root_path=root_path, access_log=access_log
    )
    await server.serve()
    return server
