"""A DHT process that stops answering (stopped, wedged or killed) no longer holds the
threads that read and renew records forever: each call gives up after the directory's
bound with a PipelineError that says so, and the announcer logs it and goes on."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import pytest

from molink.config import LayerRange
from molink.discovery.dht import SwarmDirectory
from molink.errors import PipelineError
from molink.pipeline.identity import ModelIdentity, NodeInfo

pytestmark = pytest.mark.integration

MODEL = ModelIdentity("m", "f", 2, 8, 16)
CALL_BOUND_S = 1.0
WAIT_S = 30.0  # far above the bound; before, the calls waited forever
INFO = NodeInfo("s1", MODEL, LayerRange(1, 2), "127.0.0.1:5")


def _outcome(call: Callable[[], object]) -> BaseException | None:
    """What ``call`` raised (None: it returned), run on a thread so that a call that never
    returns fails the test instead of holding it."""
    raised: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            raised.append(None)
        except BaseException as exc:  # the test reads it
            raised.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(WAIT_S)
    assert raised, f"the call was still waiting after {WAIT_S:.0f}s"
    return raised[0]


@pytest.mark.parametrize("signal_sent", [signal.SIGSTOP, signal.SIGKILL])
def test_reads_and_stores_give_up_when_the_dht_process_does_not_answer(
    signal_sent: signal.Signals,
) -> None:
    directory = SwarmDirectory(MODEL, 1).start("127.0.0.1", [])
    directory.call_timeout_s = CALL_BOUND_S
    dht_pid = directory._dht.pid
    try:
        assert directory.records() == []  # answers while running
        os.kill(dht_pid, signal_sent)
        read = _outcome(directory.records)
        assert isinstance(read, PipelineError)
        assert "did not answer a read within 1s" in str(read)
        stored = _outcome(lambda: directory.announce(INFO, 10.0))
        assert isinstance(stored, PipelineError)
    finally:
        if signal_sent == signal.SIGSTOP:
            os.kill(dht_pid, signal.SIGCONT)
        directory.shutdown()
