"""The failover frees a lost node's sequences on the nodes before it in band, through the
head's own stage. When that stage's queue stays full, the in-band release is refused: the
nodes before the lost one must still free them (by a call, as the nodes after it), or
they keep that KV for as long as the head renews their lease."""

from __future__ import annotations

import threading

import grpc

from molink.errors import PipelineError
from molink.pipeline import failover
from molink.pipeline.toy import ToyStageExecutor
from molink.pipeline.worker import ReleaseJob
from molink.transport.channel import NodeClient
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


def test_a_release_call_is_made_again_until_the_node_takes_it(monkeypatch) -> None:
    """The call that frees a lost node's sequences on the node after it fails several
    times (the link to it is down for a while, shorter than its lease): that node still
    hears from the head afterwards, which renews its lease, so the head must not give up
    on the call after a fixed few tries."""
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head, last = swarm.head, swarm.executors["n"]
        head.submit(prefill(0, 7))
        assert first_result(head).error is None
        calls: list[str] = []
        release = NodeClient.release

        def failing_five_times(self, *args, **kwargs):
            calls.append(self.address)
            if len(calls) <= 5:
                raise grpc.RpcError("unavailable")
            return release(self, *args, **kwargs)

        monkeypatch.setattr(failover, "RELEASE_RETRY_S", 0.05)
        monkeypatch.setattr(NodeClient, "release", failing_five_times)
        monkeypatch.setattr(
            head._failover, "_submit", lambda job: None
        )  # n gets no release in band
        assert head.evict_node("a", "taken out by the test")
        assert wait_until(lambda: ("h", 7) not in last.sequences, timeout=10.0)
        assert len(calls) == 6


def test_release_calls_stop_when_the_head_closes(monkeypatch) -> None:
    """Calls made again for a node that never takes them stop with the head: a node
    started later at that address must not get them."""
    calls: list[str] = []

    def always_failing(self, *args, **kwargs):
        calls.append(self.address)
        raise grpc.RpcError("unavailable")

    monkeypatch.setattr(failover, "RELEASE_RETRY_S", 0.05)
    monkeypatch.setattr(failover, "RELEASE_RETRY_MAX_S", 0.05)
    with toy_swarm((("a", 1, 2), ("n", 2, 4))) as swarm:
        head = swarm.head
        head.submit(prefill(0, 7))
        assert first_result(head).error is None
        monkeypatch.setattr(NodeClient, "release", always_failing)
        assert head.evict_node("a", "taken out by the test")
        assert wait_until(lambda: len(calls) >= 3, timeout=10.0)
    made = len(calls)
    assert not wait_until(lambda: len(calls) > made + 1, timeout=1.0)  # one may be under way
