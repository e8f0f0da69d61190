"""The failover frees a lost node's sequences on the nodes before it in band, through the
head's own stage. When that stage's queue stays full, the in-band release is refused: the
nodes before the lost one must still free them (by a call, as the nodes after it), or
they keep that KV for as long as the head renews their lease."""

from __future__ import annotations

import threading

from molink.errors import PipelineError
from molink.pipeline.toy import ToyStageExecutor
from molink.pipeline.worker import ReleaseJob
from tests.helpers.polling import first_result, wait_until
from tests.helpers.toy_swarm import prefill, toy_swarm


def test_a_refused_in_band_release_frees_the_nodes_before_the_lost_one(monkeypatch) -> None:
    """head -> a -> n, n is lost; the head's queue refuses the first in-band release."""
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, before = swarm.head, swarm.executors["a"]
        own: ToyStageExecutor = head.node._worker._executor
        head.submit(prefill(0, 7))
        assert first_result(head).error is None
        assert ("h", 7) in before.sequences and ("h", 7) in own.sequences
        submit, refused = head._failover._submit, threading.Event()

        def full_once(job: ReleaseJob) -> None:
            if not refused.is_set():
                refused.set()
                raise PipelineError("stage h is overloaded: its queue stayed full")
            submit(job)

        monkeypatch.setattr(head._failover, "_submit", full_once)
        assert head.evict_node("n", "taken out by the test")
        assert refused.is_set()
        assert wait_until(lambda: ("h", 7) not in before.sequences, timeout=10.0)
        assert wait_until(lambda: ("h", 7) not in own.sequences, timeout=10.0)
