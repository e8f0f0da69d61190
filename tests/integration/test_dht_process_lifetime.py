"""A node killed outright takes its DHT process with it (hivemind runs the DHT in a forked
process that would otherwise outlive its parent as an orphan)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers.server_process import REPO_ROOT

pytestmark = pytest.mark.integration

# A node's DHT: prints its own pid and its DHT process's, then waits to be killed.
NODE = """
import sys, time
from molink.discovery.dht import SwarmDirectory
from molink.pipeline.identity import ModelIdentity
directory = SwarmDirectory(ModelIdentity("m", "f", 2, 8, 16), 1).start("127.0.0.1", [])
print(directory._dht.pid, flush=True)
time.sleep(600)
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as stat:  # a zombie is gone, only not yet reaped
        return stat.read().split(") ")[-1][0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")
def test_the_dht_process_dies_with_a_killed_node() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    node = subprocess.Popen(
        [sys.executable, "-c", NODE], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert node.stdout is not None
        dht_pid = int(node.stdout.readline())
        assert _alive(dht_pid)
        node.send_signal(signal.SIGKILL)
        node.wait(timeout=30)
        deadline = time.monotonic() + 30
        while _alive(dht_pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(dht_pid), "the DHT process outlived its killed node"
    finally:
        node.kill()
        node.wait(timeout=30)
