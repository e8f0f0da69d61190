"""A node whose DHT process is already gone still shuts down: withdrawing its record, the
last thing a stopping node asks of the DHT, returns instead of waiting for an answer that
never comes (a signal to the whole process group, e.g. a `timeout` that expires, stops
the DHT process before the node reaches its shutdown).

The DHT process is killed in a child interpreter (tests.helpers.child_interpreter says
why not in the pytest process)."""

from __future__ import annotations

import pytest

from tests.helpers.child_interpreter import run_script

pytestmark = pytest.mark.integration

BOUND_S = 30.0  # far above the withdraw's own bound; the defect waited forever

SCRIPT = f"""
import os, signal, threading, time
from molink.config import LayerRange
from molink.discovery.dht import SwarmDirectory
from molink.pipeline.identity import ModelIdentity, NodeInfo

model = ModelIdentity("m", "f", 2, 8, 16)
directory = SwarmDirectory(model, 1).start("127.0.0.1", [])
os.kill(directory._dht.pid, signal.SIGKILL)
deadline = time.monotonic() + {BOUND_S}
while directory._dht.is_alive() and time.monotonic() < deadline:
    time.sleep(0.1)
assert not directory._dht.is_alive(), "the DHT process outlived SIGKILL"
info = NodeInfo("head", model, LayerRange(0, 2), "127.0.0.1:1")
done = threading.Event()
threading.Thread(target=lambda: (directory.withdraw(info, 15.0), done.set()), daemon=True).start()
print("withdrawn" if done.wait({BOUND_S}) else "still waiting", flush=True)
directory.shutdown()
"""


def test_withdraw_returns_when_the_dht_process_is_dead() -> None:
    printed = run_script(SCRIPT, timeout_s=3 * BOUND_S)
    assert printed.strip() == "withdrawn", "withdraw waited on a dead DHT process"
