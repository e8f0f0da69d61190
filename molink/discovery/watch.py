"""The head's reading of the DHT: nodes that announce themselves join its registry, and
nodes whose records expire leave it.

A record is admitted with the same checks as a join (model, layer count, protocol,
span); a refusal is logged once per node. A node is dropped when its record, once seen,
is no longer there (it stopped renewing), the same way a failed health check drops it.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

from molink.discovery.dht import SwarmDirectory
from molink.pipeline.identity import NodeInfo

logger = logging.getLogger(__name__)


class DiscoveringHead(Protocol):
    head_id: str

    def known_nodes(self) -> dict[str, NodeInfo]: ...

    def admit_discovered(self, info: NodeInfo) -> str | None:
        """None when admitted, else why not."""

    def drop_node(self, node_id: str, reason: str) -> None: ...


class DiscoveryWatch:
    def __init__(self, directory: SwarmDirectory, head: DiscoveringHead, interval_s: float) -> None:
        self._directory = directory
        self._head = head
        self._interval_s = interval_s
        self._seen: set[str] = set()
        self._refused: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dht-watch", daemon=True)

    def start(self) -> DiscoveryWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5.0)

    def check_once(self) -> None:
        announced = {
            node_id: info
            for node_id, (info, _) in self._directory.nodes().items()
            # Another node at layer 0 is another head: routes start at this head.
            if node_id != self._head.head_id and info.layers.start > 0
        }
        known = self._head.known_nodes()
        for node_id, info in announced.items():
            self._seen.add(node_id)
            current = known.get(node_id)
            if current is not None and (current.address, current.layers) == (
                info.address,
                info.layers,
            ):
                continue
            reason = self._head.admit_discovered(info)
            if reason is not None and self._refused.get(node_id) != reason:
                self._refused[node_id] = reason
                logger.warning("not using node %s found in the DHT: %s", node_id, reason)
        for node_id in list(self._seen):
            if node_id not in announced and node_id in known:
                self._seen.discard(node_id)
                self._head.drop_node(node_id, "its DHT record expired")

    def _loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.check_once()
            except Exception:
                logger.warning("reading the DHT failed", exc_info=True)
