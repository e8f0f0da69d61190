"""The head's watch over its stages: periodic health checks and pipeline pushes.

A stage that fails ``health_failures_to_down`` checks in a row is declared down; the head
then drops it from the registry (so its layers show up as missing and a replacement can
join) and fails the steps in flight.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable

import grpc

from molink.pipeline.identity import NodeInfo
from molink.pipeline.registry import PipelineView, StageRegistry
from molink.pipeline.wire import view_to_proto
from molink.transport.channel import NodeClient, describe_rpc_error
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb

logger = logging.getLogger(__name__)

# A stage's status message is logged and shown in status tables: kept this long at most,
# as the text of a node's description is (molink.pipeline.registry).
MAX_HEALTH_MESSAGE_CHARS = 512
# The most the head receives in one answer on its clients (health checks, pipeline
# pushes, releases: all answers are small). An honest health answer lists the heads
# holding KV on the stage (at most max_sequences_per_node, a few MiB at the default)
# and its streams (at most 256); without this, a stage could answer every check with
# max_message_bytes (256 MiB), held while the round lasts.
MAX_ANSWER_BYTES = 16 * 1024 * 1024


class HealthMonitor:
    def __init__(
        self,
        config: TransportConfig,
        registry: StageRegistry,
        on_stage_down: Callable[[NodeInfo, str], None],
    ) -> None:
        self._config = config
        self._registry = registry
        self._on_stage_down = on_stage_down
        self._lock = threading.Lock()
        # (address, node id) -> client: in a swarm each call proves the node id, so two
        # ids registered at one address (one of them lying) do not share a client.
        self._clients: dict[tuple[str, str], NodeClient] = {}
        self._failures: dict[str, int] = {}
        self._latest: dict[str, pb.HealthResponse | str] = {}
        self._round_trips: dict[str, float] = {}  # node id -> smoothed health-call time
        self._members_view: PipelineView | None = None
        self._members_of_view: frozenset[tuple[str, str]] = frozenset()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="head-health", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(self._config.health_timeout_s + 1.0)
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()

    def latest(self) -> dict[str, pb.HealthResponse | str]:
        with self._lock:
            return dict(self._latest)

    def round_trips(self) -> dict[str, float]:
        """The head's round trip to each node, from its health calls (a prior for links
        not measured yet, and how the router tells a near node from a far one)."""
        with self._lock:
            return dict(self._round_trips)

    def forget(self, node_id: str, address: str | None = None) -> None:
        """A node (re)joined: start counting its failures afresh, on a fresh channel.

        A channel that failed to connect waits out a reconnect backoff (up to seconds)
        and fails calls at once meanwhile, so a replacement at the same address would
        fail its first checks and be dropped again.
        """
        with self._lock:
            self._failures.pop(node_id, None)
            self._latest.pop(node_id, None)
            self._round_trips.pop(node_id, None)
            client = self._clients.pop((address, node_id), None) if address else None
        if client is not None:
            client.close()

    def prune(self, view: PipelineView) -> None:
        """Close the clients of nodes no longer in ``view`` at their address, whatever
        took them out (eviction, a clean leave, a new registration elsewhere): each
        holds a channel that would otherwise live as long as the head. What the head
        kept of a departed node (its latest answer, failure count, round trip) goes too:
        a swarm's churn mints new node ids, and those entries would pile up for good."""
        current = {(stage.address, stage.node_id) for stage in view.stages}
        ids = {stage.node_id for stage in view.stages}
        with self._lock:
            gone = [key for key in self._clients if key not in current]
            clients = [self._clients.pop(key) for key in gone]
            for kept in (self._failures, self._latest, self._round_trips):
                for node_id in [n for n in kept if n not in ids]:
                    del kept[node_id]
        for client in clients:
            client.close()

    def push_view(self, view: PipelineView, skip: str | None = None) -> None:
        """Tell every stage (but the head and ``skip``) about a new pipeline, in the
        background; a stage that misses it fetches the pipeline when a step's epoch is
        newer than its own."""
        targets = [s for s in view.stages if s.node_id not in (view.head_id, skip)]
        if targets:
            threading.Thread(
                target=self._push, args=(view, targets), name="head-push", daemon=True
            ).start()

    def probe(self, stage: NodeInfo) -> str | None:
        """One health check now: None if ``stage`` answers, else why not."""
        failures = self.probe_many([stage])
        return failures.get(stage.node_id)

    def probe_many(self, stages: list[NodeInfo]) -> dict[str, str]:
        """One health check of each of ``stages`` at once; the node id and reason of each
        that does not answer within the health timeout (a frozen process keeps its socket
        open, so only the timeout notices it)."""
        calls = []
        failures: dict[str, str] = {}
        for stage in stages:
            client = self._client(stage)
            if client is None:
                failures[stage.node_id] = "no longer in the pipeline"
                continue
            metadata, nonce = client.proof_request()
            try:
                call = client.stub.Health.future(
                    self._request(), timeout=self._config.health_timeout_s, metadata=metadata
                )
            except ValueError:  # CLOSED_CHANNEL
                failures[stage.node_id] = "no longer in the pipeline"
                continue
            calls.append((stage, client, call, nonce))
        for stage, client, call, nonce in calls:
            try:
                call.result()
                client.check_proof(call, nonce)
            except grpc.RpcError as exc:
                failures[stage.node_id] = describe_rpc_error(exc)
        return failures

    def _request(self) -> pb.HealthRequest:
        """Every health call renews the head's lease on the stage's sequences."""
        return pb.HealthRequest(head_id=self._registry.view().head_id)

    def check_once(self) -> None:
        view = self._registry.view()
        calls = []
        done: dict[str, float] = {}
        for stage in view.stages:
            if stage.node_id == view.head_id:
                continue
            client = self._client(stage)
            if client is None:  # removed since the round read the view
                continue
            metadata, nonce = client.proof_request()
            started = time.monotonic()
            try:
                call = client.stub.Health.future(
                    self._request(), timeout=self._config.health_timeout_s, metadata=metadata
                )
            except ValueError:  # CLOSED_CHANNEL: the other nodes are still checked
                continue
            call.add_done_callback(
                lambda _, node_id=stage.node_id: done.setdefault(node_id, time.monotonic())
            )
            calls.append((stage, client, call, nonce, started))
        for stage, client, call, nonce, started in calls:
            try:
                response = call.result()
                client.check_proof(call, nonce)
            except grpc.RpcError as exc:
                self._failed(stage, describe_rpc_error(exc))
                continue
            self._note_round_trip(stage, done.get(stage.node_id, time.monotonic()) - started)
            self._answered(stage, response)

    def _note_round_trip(self, stage: NodeInfo, seconds: float) -> None:
        node_id = stage.node_id
        with self._lock:
            if (stage.address, node_id) not in self._members():
                return  # left while the round ran: its entries were pruned
            old = self._round_trips.get(node_id)
            self._round_trips[node_id] = seconds if old is None else 0.7 * old + 0.3 * seconds

    def _loop(self) -> None:
        while not self._stop.wait(self._config.health_interval_s):
            try:
                self.check_once()
            except Exception:
                logger.exception("health check round failed")

    def _answered(self, stage: NodeInfo, response: pb.HealthResponse) -> None:
        response = self._kept(stage, response)
        with self._lock:
            if (stage.address, stage.node_id) not in self._members():
                return  # left while the round ran: its entries were pruned
            self._failures[stage.node_id] = 0
            previous = self._latest.get(stage.node_id)
            self._latest[stage.node_id] = response
        was_degraded = (
            isinstance(previous, pb.HealthResponse) and previous.status == pb.HEALTH_STATUS_DEGRADED
        )
        if response.status == pb.HEALTH_STATUS_DEGRADED and not was_degraded:
            logger.warning("stage %s reports: %s", stage.describe(), response.message)

    def _kept(self, stage: NodeInfo, response: pb.HealthResponse) -> pb.HealthResponse:
        """What the head keeps of ``stage``'s answer: the router reads it for every new
        sequence, so only this head's own usage there (one entry) and the stage's links
        to nodes of this head's view (one per node, this head's or shared) are kept, not
        whatever the stage chose to list; the message is cut and made printable."""
        view = self._registry.view()
        kept = pb.HealthResponse()
        kept.CopyFrom(response)
        kept.ClearField("heads")
        kept.ClearField("links")
        mine = next((u for u in response.heads if u.head_id == view.head_id), None)
        if mine is not None:
            kept.heads.append(mine)
        members = {s.node_id for s in view.stages}
        links: dict[str, pb.LinkReport] = {}
        for report in response.links:
            if (
                report.from_node_id == stage.node_id
                and report.head_id in ("", view.head_id)
                and report.to_node_id in members
            ):
                links[report.to_node_id] = report
        kept.links.extend(links.values())
        kept.message = "".join(
            c if c.isprintable() else "?" for c in response.message[:MAX_HEALTH_MESSAGE_CHARS]
        )
        # Pushed to every stage as the node's speed (and shown): a number that is no
        # measurement (NaN, infinite, negative) counts as none, as a join's would not pass.
        for name in ("throughput_tokens_per_s", "uptime_s"):
            value = getattr(kept, name)
            if not (math.isfinite(value) and value >= 0):
                setattr(kept, name, 0.0)
        return kept

    def _failed(self, stage: NodeInfo, detail: str) -> None:
        with self._lock:
            if (stage.address, stage.node_id) not in self._members():
                return  # left while the round ran: nothing to count or take down
            count = self._failures.get(stage.node_id, 0) + 1
            self._failures[stage.node_id] = count
            self._latest[stage.node_id] = f"unreachable: {detail}"
        logger.warning(
            "stage %s failed a health check (%d/%d): %s",
            stage.describe(),
            count,
            self._config.health_failures_to_down,
            detail,
        )
        if count >= self._config.health_failures_to_down:
            with self._lock:
                self._failures.pop(stage.node_id, None)
                client = self._clients.pop((stage.address, stage.node_id), None)
            if client is not None:  # a node that rejoins there gets a fresh channel
                client.close()
            self._on_stage_down(stage, detail)

    def _push(self, view: PipelineView, targets: list[NodeInfo]) -> None:
        message = view_to_proto(view)
        for stage in targets:
            client = self._client(stage)
            if client is None:  # removed since this view: the push is not its to get
                continue
            try:
                client.update_pipeline(message)
            except ValueError:  # CLOSED_CHANNEL
                logger.debug("%s left before the push of epoch %d", stage.describe(), view.epoch)
            except grpc.RpcError as exc:
                logger.warning(
                    "could not push pipeline epoch %d to %s: %s",
                    view.epoch,
                    stage.describe(),
                    describe_rpc_error(exc),
                )

    # CLOSED_CHANNEL: gRPC raises ValueError for a call on a closed channel. A client
    # handed out by ``_client`` can be closed before its call starts, by a removal's prune
    # on another thread: the node left, so there is nothing to call.

    def _client(self, stage: NodeInfo) -> NodeClient | None:
        """The client of ``stage``; in a swarm the node at its address must prove to be
        ``stage``. None when ``stage`` is no longer in the pipeline at that address: the
        push thread, a probe or a check round may work from a view read before a removal,
        and a client made after the removal's prune would never be closed."""
        key = (stage.address, stage.node_id)
        with self._lock:
            # Under the lock: a removal's prune (which takes it) comes after the registry
            # changed, so a client made before that change is closed by the prune.
            if key not in self._members():
                return None
            client = self._clients.get(key)
            if client is None:
                client = self._clients[key] = NodeClient(
                    stage.address, self._config, stage.node_id, MAX_ANSWER_BYTES
                )
            return client

    def _members(self) -> frozenset[tuple[str, str]]:
        """(address, node id) of every node of the current view; made once per view (a
        round asks it for each of up to max_pipeline_nodes stages). Under ``_lock``."""
        view = self._registry.view()
        if view is not self._members_view:
            self._members_view = view
            self._members_of_view = frozenset((s.address, s.node_id) for s in view.stages)
        return self._members_of_view
