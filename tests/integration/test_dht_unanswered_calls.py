"""A DHT process that stops answering (stopped, wedged or killed) no longer holds the
threads that read and renew records forever: each call gives up after the directory's
bound with a PipelineError that says so, and the announcer logs it and goes on.

The DHT process is stopped or killed in a child interpreter (tests.helpers.
child_interpreter says why not in the pytest process); the script prints each call's
outcome as one line."""

from __future__ import annotations

import signal

import pytest

from tests.helpers.child_interpreter import run_script

pytestmark = pytest.mark.integration

CALL_BOUND_S = 1.0
WAIT_S = 30.0  # far above the bound; before, the calls waited forever

SCRIPT = """
import os, signal, sys, threading
from molink.config import LayerRange
from molink.discovery.dht import SwarmDirectory
from molink.pipeline.identity import ModelIdentity, NodeInfo

MODEL = ModelIdentity("m", "f", 2, 8, 16)
INFO = NodeInfo("s1", MODEL, LayerRange(1, 2), "127.0.0.1:5")
SIGNAL, CALL_BOUND_S, WAIT_S = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])


def outcome(call):
    # run on a thread, so that a call that never returns is reported instead of holding us
    raised = []

    def run():
        try:
            call()
            raised.append("returned")
        except BaseException as exc:
            raised.append(f"{type(exc).__name__}: {exc}")

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(WAIT_S)
    return raised[0] if raised else "still waiting"


directory = SwarmDirectory(MODEL, 1).start("127.0.0.1", [])
directory.call_timeout_s = CALL_BOUND_S
dht_pid = directory._dht.pid
print("running:", directory.records(), flush=True)
os.kill(dht_pid, SIGNAL)
print("read:", outcome(directory.records), flush=True)
print("store:", outcome(lambda: directory.announce(INFO, 10.0)), flush=True)
if SIGNAL == signal.SIGSTOP:
    os.kill(dht_pid, signal.SIGCONT)
directory.shutdown()
"""


def _run(signal_sent: signal.Signals) -> dict[str, str]:
    args = [str(int(signal_sent)), str(CALL_BOUND_S), str(WAIT_S)]
    printed = run_script(SCRIPT, timeout_s=4 * WAIT_S, args=args)
    lines = [line.split(": ", 1) for line in printed.splitlines() if ": " in line]
    return {key: value for key, value in lines}


@pytest.mark.parametrize("signal_sent", [signal.SIGSTOP, signal.SIGKILL])
def test_reads_and_stores_give_up_when_the_dht_process_does_not_answer(
    signal_sent: signal.Signals,
) -> None:
    outcomes = _run(signal_sent)
    assert outcomes["running"] == "[]"  # answers while running
    assert outcomes["read"].startswith("PipelineError: ")
    assert "did not answer a read within 1s" in outcomes["read"]
    assert outcomes["store"].startswith("PipelineError: ")
