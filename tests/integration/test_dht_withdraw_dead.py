"""A node whose DHT process is already gone still shuts down: withdrawing its record, the
last thing a stopping node asks of the DHT, returns instead of waiting for an answer that
never comes (a signal to the whole process group, e.g. a `timeout` that expires, stops
the DHT process before the node reaches its shutdown)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from molink.config import LayerRange
from molink.discovery.dht import SwarmDirectory
from molink.pipeline.identity import ModelIdentity, NodeInfo

pytestmark = pytest.mark.integration

MODEL = ModelIdentity("m", "f", 2, 8, 16)
BOUND_S = 30.0  # far above the withdraw's own bound; the defect waited forever


def test_withdraw_returns_when_the_dht_process_is_dead() -> None:
    directory = SwarmDirectory(MODEL, 1).start("127.0.0.1", [])
    try:
        dht_pid = directory._dht.pid
        os.kill(dht_pid, signal.SIGKILL)
        deadline = time.monotonic() + BOUND_S
        while directory._dht.is_alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not directory._dht.is_alive()
        info = NodeInfo("head", MODEL, LayerRange(0, 2), "127.0.0.1:1")
        done = threading.Event()
        worker = threading.Thread(
            target=lambda: (directory.withdraw(info, 15.0), done.set()), daemon=True
        )
        worker.start()
        assert done.wait(BOUND_S), "withdraw waited on a dead DHT process"
    finally:
        directory.shutdown()
