"""Keeps a node's DHT record alive: announce now, renew every third of its lifetime.

A node that stops renewing (it died, froze or lost its network) disappears from the DHT
when its record expires; heads drop it from their routes then, if their health checks
have not already.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from molink.discovery.dht import SwarmDirectory
from molink.pipeline.identity import NodeInfo

logger = logging.getLogger(__name__)


class Announcer:
    def __init__(
        self, directory: SwarmDirectory, info: Callable[[], NodeInfo], ttl_s: float
    ) -> None:
        self._directory = directory
        self._info = info
        self._ttl_s = ttl_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dht-announce", daemon=True)

    def start(self) -> Announcer:
        self._announce()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)
        self._directory.withdraw(self._info(), self._ttl_s)

    def _loop(self) -> None:
        while not self._stop.wait(self._ttl_s / 3):
            self._announce()

    def _announce(self) -> None:
        try:
            if not self._directory.announce(self._info(), self._ttl_s):
                logger.warning("the DHT did not store this node's record; retrying later")
        except Exception:
            logger.warning("announcing this node in the DHT failed", exc_info=True)
