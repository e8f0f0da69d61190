"""A DHT process that never reports ready no longer holds the node starting it: the start
gives up after the bootstrap timeout and a margin, ends the process and raises a
PipelineError saying so.

What makes it never ready here is what did in practice: hivemind's futures write to their
origin under one lock shared by every process forked from it, and a sibling DHT process
killed while holding it leaves it held. The script holds that lock itself before starting
a directory, in a child interpreter (the lock must stay usable in the pytest process)."""

from __future__ import annotations

import pytest

from molink.discovery.dht import EXIT_GRACE_S
from tests.helpers.child_interpreter import run_script

pytestmark = pytest.mark.integration

BOOTSTRAP_S = 2.0
MARGIN_S = 1.0

SCRIPT = f"""
import time
from hivemind.utils.mpfuture import MPFuture
import molink.discovery.dht as dht_module
from molink.discovery.dht import SwarmDirectory
from molink.errors import PipelineError
from molink.pipeline.identity import ModelIdentity

dht_module.BOOTSTRAP_TIMEOUT_S = {BOOTSTRAP_S}
dht_module.READY_MARGIN_S = {MARGIN_S}
MPFuture._update_lock.acquire()  # as a killed sibling DHT process would leave it
directory = SwarmDirectory(ModelIdentity("m", "f", 2, 8, 16), 1)
started = time.monotonic()
try:
    directory.start("127.0.0.1", [])
except PipelineError as exc:
    print(f"{{time.monotonic() - started:.1f}}", flush=True)
    print(exc, flush=True)
else:
    print("started", flush=True)
"""


def test_a_dht_process_that_never_reports_ready_is_a_clear_error() -> None:
    # Before, the start waited forever: the script was killed at this timeout.
    printed = run_script(SCRIPT, timeout_s=60).splitlines()
    assert printed[0] != "started"
    # + the grace for the process to exit by itself, + its own start
    assert float(printed[0]) < BOOTSTRAP_S + MARGIN_S + EXIT_GRACE_S + 5
    assert "could not join the DHT through no peer" in printed[1]
    assert "its process did not report ready" in printed[1]
