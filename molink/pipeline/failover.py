"""The head's side of failover: after a node is evicted, free what its sequences hold on
the surviving nodes and hand the engine a ``NodeFailure`` (molink/engine/recovery.py).

Freeing happens in two parts, because the lost node cuts each route in two:

* the nodes before it on the route get an in-band release from the head, on the same
  streams as the steps, so it reaches each of them after every step already sent there
  (a replay may still reach one of them first along another route: like the call below,
  the release names the first step not yet submitted when the node was lost);
* the nodes after it get a ``Release`` call of their own (nothing reaches them through
  the lost node any more). The head goes on checking them, which renews their lease
  on its sequences, so a call that fails is made again (a node gone as well frees them
  when its lease lapses). That call travels apart from the steps, so a replay of one of its
  sequences through the same node may arrive first: it names the first step not yet
  submitted when the node was lost, and a node keeps a copy that a plan of that step
  or a later one started.

The lost node itself may be alive (frozen for a while, cut off) and keep what it held
until its lease on this head's sequences lapses; when the head takes it back before that
(``node_back``), it frees them there with the same kind of call.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import grpc

from molink.engine.recovery import NodeFailure, RecoveryStats
from molink.pipeline.head_flights import CarriedRelease
from molink.pipeline.identity import NodeInfo
from molink.pipeline.worker import ReleaseJob
from molink.placement.route import Route, RouteHop
from molink.step import FailureKind
from molink.transport.channel import NodeClient, describe_rpc_error
from molink.transport.config import TransportConfig

logger = logging.getLogger(__name__)

SubmitJob = Callable[[ReleaseJob], None]
RELEASE_ATTEMPTS = 3  # of an in-band release the head's own stage refused
RELEASE_RETRY_S = 0.5  # first wait before a failed release call is made again
RELEASE_RETRY_MAX_S = 4.0  # longest wait between two calls
RELEASE_GIVE_UP_LEASES = 2.0  # calls stop this many leases after the first


class FailoverDesk:
    """Thread-safe: the head's health, deadline and receiving threads report losses; the
    engine thread takes them."""

    def __init__(self, head_id: str, config: TransportConfig, submit: SubmitJob) -> None:
        self.head_id = head_id
        self.stats = RecoveryStats()
        self._config = config
        self._submit = submit
        self._lock = threading.Lock()
        self._failures: list[NodeFailure] = []
        self._next_step = 0  # the first step id not yet submitted
        # Lost node -> (the sequences it held, the step bound, when): a node evicted while
        # alive keeps them until its lease on this head lapses, unless taken back first.
        self._left_behind: dict[str, tuple[set[int], int, float]] = {}
        self._closed = threading.Event()  # the head closed: release calls stop

    def close(self) -> None:
        """The head is closing: calls still being made again stop (a node restarted at
        the address later must not get them)."""
        self._closed.set()

    def note_submitted(self, step_id: int) -> None:
        """The head submitted ``step_id`` (step ids grow; replays get new ones)."""
        with self._lock:
            self._next_step = max(self._next_step, step_id + 1)

    def next_step(self) -> int:
        """The first step id not yet submitted."""
        with self._lock:
            return self._next_step

    def take(self) -> list[NodeFailure]:
        with self._lock:
            failures, self._failures = self._failures, []
        return failures

    def node_lost(
        self,
        node: NodeInfo,
        kind: FailureKind,
        detail: str,
        groups: dict[str, tuple[Route, list[int]]],
        before: int | None = None,
    ) -> NodeFailure:
        """``node`` is out of the registry and its routes are forgotten; ``groups`` are the
        sequences that were on each of its routes. ``before``: the first step not yet
        submitted when it left the registry (None: now). A step submitted from then on
        either avoids the node or fails at once (the head checks its route after putting
        it on record), so a copy it sent is not lost with the node, even when the engine
        sent it before the routes were forgotten."""
        seq_ids = tuple(sorted(s for _, ids in groups.values() for s in ids))
        if before is None:
            before = self.next_step()
        failure = NodeFailure(node.node_id, kind, detail, seq_ids, time.monotonic(), before)
        self.stats.note_failover()
        logger.error(
            "failover: node %s lost (%s: %s); %d sequence(s) on %d route(s) will be replayed",
            node.describe(),
            kind.name.lower(),
            detail,
            len(seq_ids),
            len(groups),
        )
        for route, ids in groups.values():
            self._release_survivors(route, node.node_id, tuple(ids), before)
        with self._lock:
            self._failures.append(failure)
            self._forget_left_behind(failure.detected_at)
            self._left_behind[node.node_id] = (set(seq_ids), before, failure.detected_at)
        return failure

    def node_back(self, node: NodeInfo) -> None:
        """``node`` joins the pipeline again: free there what it held when it was lost (a
        node evicted while alive keeps it, and the head's health checks renew its lease
        from now on). Copies that steps from the loss on started there stay."""
        with self._lock:
            held = self._left_behind.pop(node.node_id, None)
        if held is None or not held[0]:
            return
        seq_ids, before, _ = held
        logger.info(
            "node %s is back: freeing the %d sequence(s) it held when it was lost",
            node.describe(),
            len(seq_ids),
        )
        threading.Thread(
            target=self._release_directly,
            args=([(node.address, node.node_id)], tuple(sorted(seq_ids)), before),
            name="head-release",
            daemon=True,
        ).start()

    def _forget_left_behind(self, now: float) -> None:
        """Past twice the lease, a lost node's lease on these sequences has lapsed."""
        expired = now - 2 * self._config.lease_s
        for node_id, (_, _, at) in list(self._left_behind.items()):
            if at < expired:
                del self._left_behind[node_id]

    def release_carried(self, release: CarriedRelease, failed_id: str) -> None:
        """A step that failed (at ``failed_id``, "" when no node is named) carried
        releases: its route's finished sequences, already gone from the route book. The
        nodes it may not have reached free them, up to copies started by that step: in
        band along the route, and by a call to the nodes after ``failed_id``, which
        nothing may reach in band."""
        route, seq_ids, step_id = release.route, release.seq_ids, release.step_id
        if failed_id == self.head_id:
            self._release_apart(route.hops[1:], seq_ids, step_id)
            return
        if route.index_of(failed_id) is not None:
            self._release_survivors(route, failed_id, seq_ids, step_id)
            return
        try:
            self._submit(ReleaseJob(self.head_id, route, seq_ids, True, step_id))
        except Exception:
            logger.warning("in-band release of %d sequences failed", len(seq_ids), exc_info=True)
            self._release_apart(route.hops[1:], seq_ids, step_id)

    def _release_apart(
        self, hops: tuple[RouteHop, ...], seq_ids: tuple[int, ...], before: int
    ) -> None:
        """On a thread of its own: ``_release_refused``."""
        threading.Thread(
            target=self._release_refused,
            args=([(h.address, h.node_id) for h in hops], seq_ids, before),
            name="head-release",
            daemon=True,
        ).start()

    def _release_refused(
        self, hops: list[tuple[str, str]], seq_ids: tuple[int, ...], before: int
    ) -> None:
        """The head's own stage refused a step or an in-band release (its queue stayed
        full), so nothing went along the route: ``hops`` (address, node id) free the
        sequences by a call, and the head's stage in band once its queue has room (a
        release queued now would wait for the same room). A step older than ``before``
        still on its way to those nodes is dropped there (molink.pipeline.release_bounds)."""
        self._release_directly(hops, seq_ids, before)
        for attempt in range(1, RELEASE_ATTEMPTS + 1):
            try:
                self._submit(ReleaseJob(self.head_id, None, seq_ids, False, before))
                return
            except Exception as exc:
                logger.warning(
                    "release of %d sequences on the head's stage failed (attempt %d of %d): %s",
                    len(seq_ids),
                    attempt,
                    RELEASE_ATTEMPTS,
                    exc,
                )

    def left_behind(self, lost_id: str, seq_ids: tuple[int, ...]) -> None:
        """Releases ``lost_id`` may not have got before it was lost (to free there if it
        comes back)."""
        with self._lock:
            held = self._left_behind.get(lost_id)
            if held is not None:
                held[0].update(seq_ids)

    def _release_survivors(
        self, route: Route, lost_id: str, seq_ids: tuple[int, ...], before: int
    ) -> None:
        index = route.index_of(lost_id)
        if index is None:
            return
        try:  # the head's own stage and the nodes before the lost one, in band (a replay
            # on another route may reach one of them first: it keeps the replay's copy)
            self._submit(ReleaseJob(self.head_id, route, seq_ids, True, before))
        except Exception:
            logger.warning("in-band release of %d sequences failed", len(seq_ids), exc_info=True)
            self._release_apart(route.hops[1:index], seq_ids, before)
        after = [(hop.address, hop.node_id) for hop in route.hops[index + 1 :]]
        if after:
            threading.Thread(
                target=self._release_directly,
                args=(after, seq_ids, before),
                name="head-release",
                daemon=True,
            ).start()

    def _release_directly(
        self, hops: list[tuple[str, str]], seq_ids: tuple[int, ...], before: int
    ) -> None:
        """Frees ``seq_ids`` on each (address, node id) of ``hops``. A node the head still
        checks renews its lease on these sequences, so a call that fails (a busy node, a
        link down for a while) is made again, after a wait that grows, until the node took
        it or twice its lease has passed (by then a node the head could not reach lost
        them with its lease; one it reached took a call too). One slow node does not hold
        up the others: each round calls those not done yet."""
        give_up_at = time.monotonic() + RELEASE_GIVE_UP_LEASES * self._config.lease_s
        wait, attempt = RELEASE_RETRY_S, 1
        while True:
            hops = [h for h in hops if not self._release_on(*h, seq_ids, before, attempt)]
            if not hops:
                return
            if self._closed.is_set():
                return
            if time.monotonic() + wait > give_up_at:
                logger.error(
                    "gave up freeing %d sequences on %s after %d attempts",
                    len(seq_ids),
                    ", ".join(address for address, _ in hops),
                    attempt,
                )
                return
            if self._closed.wait(wait):
                return
            wait, attempt = min(2 * wait, RELEASE_RETRY_MAX_S), attempt + 1

    def _release_on(
        self, address: str, node_id: str, seq_ids: tuple[int, ...], before: int, attempt: int
    ) -> bool:
        """One release call; whether the node took it. Each call has a channel of its own,
        closed before any wait: gRPC shares connections between channels to one address,
        and one kept in its reconnect backoff would fail the head's other calls there at
        once."""
        client = NodeClient(address, self._config, node_id)
        try:
            client.release(
                self.head_id,
                list(seq_ids),
                timeout=self._config.rpc_timeout_s,
                started_before_step=before,
            )
            return True
        except grpc.RpcError as exc:
            logger.warning(
                "release of %d sequences on %s failed (attempt %d): %s",
                len(seq_ids),
                address,
                attempt,
                describe_rpc_error(exc),
            )
            return False
        finally:
            client.close()
