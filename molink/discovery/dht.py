"""The swarm's directory in a DHT: announce this node, read everyone else's records.

Built on hivemind's DHT, the one Petals' public swarms run on: a maintained Kademlia over
libp2p with expiring, sub-keyed records, which is exactly the shape needed here (one key
per model, one subkey per node, an expiry on each). Its wheel ships its libp2p daemon, so
nothing is downloaded at install time, and it leaves torch, protobuf and grpcio as they
are. Values are msgpack-serialized by hivemind, never pickled.

In a swarm (a swarm key), records are signed by their node and sealed for members
(``molink.security.sealing``, which says why that, not the transport, is the protection
here): members' DHT nodes refuse to store or accept anything else, and a record that is
unsigned, from a non-member, expired or replayed is ignored with a log line.
"""

from __future__ import annotations

import concurrent.futures
import ipaddress
import logging
import os
import time
from collections import OrderedDict
from typing import Any

import msgpack

from molink.discovery.newest import NewestRecords, SequenceClock, SwarmRecord
from molink.discovery.parent_death import die_with_parent
from molink.discovery.records import (
    RecordError,
    info_of,
    record_leaving,
    record_of,
    record_seq,
    record_ttl,
    swarm_key,
)
from molink.errors import PipelineError
from molink.pipeline.identity import ModelIdentity, NodeInfo
from molink.security.credentials import SwarmCredentials
from molink.security.sealing import RecordSeal

logger = logging.getLogger(__name__)

BOOTSTRAP_TIMEOUT_S = 30.0
# A stopping node waits this long for its record's withdrawal; the record expires anyway.
WITHDRAW_TIMEOUT_S = 5.0
# The longest a read or a store waits for the DHT process's answer. hivemind's blocking
# calls wait without a bound, so a DHT process that died or stopped answering (killed,
# stopped, wedged) would hold the announcing and watching threads, and whoever joins
# them, forever; a lookup across a live swarm takes a few of its 3 s request timeouts.
DHT_CALL_TIMEOUT_S = 30.0
# A DHT process reports ready at most this long after its own bootstrap timeout.
READY_MARGIN_S = 15.0
EXIT_GRACE_S = 2.0  # for a DHT process that failed to start to exit by itself
# A record stored to outlast a copy that expires later expires this much after it.
OUTLAST_S = 1.0
MAX_IGNORED_NODES = 1024  # refused records remembered (so as to log each reason once)


__all__ = ["SwarmDirectory", "SwarmRecord", "advertised_maddr"]


def _node_bound_dht_class(base: type) -> type:
    """hivemind's DHT process, ended by the kernel when this node's process dies (see
    ``parent_death``); hivemind itself is imported only by nodes that use the DHT."""

    node_pid = os.getpid()

    class NodeBoundDHT(base):  # type: ignore[misc, valid-type]
        def run(self) -> None:
            die_with_parent(node_pid)
            super().run()

    return NodeBoundDHT


def _end(dht: Any) -> None:
    """Stops a DHT process that did not start (it may hang, or be half-started). One that
    reported its failure exits by itself and is given EXIT_GRACE_S to: a signal could stop
    it inside one of the writes hivemind guards with a lock shared by every process forked
    from this one, leaving that lock held for good."""
    if dht.pid is None:  # never forked
        return
    dht.join(EXIT_GRACE_S)
    if dht.is_alive():
        dht.terminate()
        dht.join(5.0)
        if dht.is_alive():
            dht.kill()


def advertised_maddr(maddrs: list[str], advertise_host: str | None) -> str:
    """The one of a DHT node's listening multiaddresses that other machines should dial.

    A DHT bound to every interface lists loopback first; a peer on another machine needs
    the advertised host instead, on the same port and peer id (``/dns/`` for a name, e.g.
    a container's service name)."""
    if not maddrs:
        return ""
    if not advertise_host:
        return maddrs[0]
    host = advertise_host.strip("[]")
    try:
        protocol = "ip6" if ipaddress.ip_address(host).version == 6 else "ip4"
    except ValueError:
        protocol = "dns"
    wanted = f"/{protocol}/{host}/"
    for maddr in maddrs:
        if maddr.startswith(wanted):
            return maddr
    # "/ip4/127.0.0.1/tcp/PORT/p2p/ID": keep everything after the host.
    rest = maddrs[0].split("/", 3)[3]
    return f"{wanted}{rest}"


class SwarmDirectory:
    """One node's handle on the DHT. ``start`` raises PipelineError, naming the peer, when
    the bootstrap peer cannot be reached (within BOOTSTRAP_TIMEOUT_S)."""

    def __init__(
        self,
        model: ModelIdentity,
        protocol_version: int,
        credentials: SwarmCredentials | None = None,
    ) -> None:
        self._model = model
        self._protocol = protocol_version
        self._seal = RecordSeal(credentials) if credentials is not None else None
        self._key = self._seal.scoped(swarm_key(model)) if self._seal else swarm_key(model)
        self._dht: Any = None
        self._advertise_host: str | None = None
        # node id -> why its record is ignored (logged once while remembered)
        self._ignored: OrderedDict[str, str] = OrderedDict()
        self._sequence = SequenceClock()
        self._announced = False  # whether a record of this run was stored yet
        self._newest = NewestRecords()
        self.call_timeout_s = DHT_CALL_TIMEOUT_S

    def start(
        self,
        host: str,
        initial_peers: list[str],
        client_mode: bool = False,
        advertise_host: str | None = None,
    ) -> SwarmDirectory:
        """``client_mode``: only read and write through the peers (e.g. ``molink status``);
        such a node listens on no port and stores no one's records. ``advertise_host``: the
        host other machines reach this node at (its ``address`` names it)."""
        self._advertise_host = advertise_host
        import hivemind  # imported here: the daemon it starts is only needed by swarm nodes

        from molink.security.dht_validator import SealedRecordValidator

        started = time.monotonic()
        dht = _node_bound_dht_class(hivemind.DHT)(
            initial_peers=initial_peers or None,
            host_maddrs=[f"/ip4/{host}/tcp/0"],
            start=False,
            startup_timeout=BOOTSTRAP_TIMEOUT_S,
            record_validators=[SealedRecordValidator(self._seal)] if self._seal else [],
            client_mode=client_mode,
        )
        try:
            # hivemind's own start waits for the process's "ready" without a bound; a
            # process that never says it (e.g. it inherited a lock a killed sibling held)
            # would hold this node forever.
            dht.run_in_background(await_ready=True, timeout=BOOTSTRAP_TIMEOUT_S + READY_MARGIN_S)
        except Exception as exc:  # hivemind raises its daemon's own errors
            _end(dht)
            why = str(exc) or "its process did not report ready"
            raise PipelineError(
                f"could not join the DHT through {', '.join(initial_peers) or 'no peer'} "
                f"within {time.monotonic() - started:.0f}s: {why}"
            ) from None
        self._dht = dht
        logger.info("DHT node at %s", self.address)
        return self

    @property
    def address(self) -> str:
        """A multiaddress other nodes can bootstrap from."""
        if self._dht is None:
            return ""
        maddrs = [str(m) for m in self._dht.get_visible_maddrs()]
        return advertised_maddr(maddrs, self._advertise_host)

    def announce(self, info: NodeInfo, ttl_s: float) -> bool:
        """Stores this node's record for ``ttl_s``. The DHT keeps, per node, the copy that
        expires last and refuses the others: when a copy of this node that expires later
        is stored (its leaving record, or a former run's record with a longer lifetime),
        the record is stored to expire just after it instead, else the node would stay
        unseen (or be read as its former self) until that copy expired. Checked at the
        first announcement and whenever one is refused."""
        from hivemind.utils import get_dht_time

        expires = get_dht_time() + ttl_s
        if self._announced and self._store(info, expires, leaving=False):
            return True
        self._announced = True
        stored_until = self._stored_expiry(info.node_id)
        if stored_until is not None and stored_until >= expires:
            expires = stored_until + OUTLAST_S
        return self._store(info, expires, leaving=False)

    def _store(self, info: NodeInfo, expires: float, leaving: bool) -> bool:
        from hivemind.utils import get_dht_time

        value = self._value(info, max(0.0, expires - get_dht_time()), leaving)
        stored = self._dht.store(self._key, value, expires, subkey=info.node_id, return_future=True)
        return bool(self._answer(stored, "a store of this node's record"))

    def _stored_expiry(self, node_id: str) -> float | None:
        """When the copy of ``node_id``'s record that the DHT holds expires (None: none)."""
        found = self._read()
        if found is None or not isinstance(found.value, dict):
            return None
        entry = found.value.get(node_id)
        return float(entry.expiration_time) if entry is not None else None

    def withdraw(self, info: NodeInfo, ttl_s: float) -> None:
        """Best effort (else the record expires): a leaving record replaces it. It lives as
        long as a renewal would, so that it outlives, and in every merge outranks, each
        copy of the node's earlier records that a peer or a cache still holds."""
        from hivemind.utils import get_dht_time

        if not self._dht.is_alive():
            return  # its process is gone (a signal to the whole group): nothing would answer
        try:
            value = self._value(info, ttl_s, leaving=True)
            expires = get_dht_time() + ttl_s
            stored = self._dht.store(
                self._key, value, expires, subkey=info.node_id, return_future=True
            )
            stored.result(timeout=WITHDRAW_TIMEOUT_S)
        except Exception:
            logger.debug("withdrawing the DHT record failed", exc_info=True)

    def _read(self) -> Any:
        """The model's key as the DHT holds it now (hivemind's ValueWithExpiration or None)."""
        return self._answer(self._dht.get(self._key, latest=True, return_future=True), "a read")

    def _answer(self, future: Any, what: str) -> Any:
        """The DHT process's answer to one call, waited for at most DHT_CALL_TIMEOUT_S;
        PipelineError when it does not come (the call is cancelled)."""
        try:
            return future.result(timeout=self.call_timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            alive = "running" if self._dht.is_alive() else "gone"
            raise PipelineError(
                f"the DHT did not answer {what} within {self.call_timeout_s:g}s "
                f"(its process is {alive})"
            ) from None

    def _value(self, info: NodeInfo, ttl_s: float, leaving: bool) -> object:
        record = record_of(info, ttl_s, self._sequence.next(), leaving)
        if self._seal is None:
            return record
        return self._seal.seal(msgpack.packb(record), ttl_s)

    def _record(self, node_id: str, value: object) -> object:
        """The plain record in a stored value; RecordError if it is not a valid one."""
        if self._seal is None:
            return value
        signed, reason = self._seal.open(value, node_id)
        if signed is None:
            raise RecordError(reason)
        try:
            return msgpack.unpackb(signed.payload, raw=False)
        except (ValueError, msgpack.UnpackException):
            raise RecordError("the signed payload is not msgpack") from None

    def nodes(self) -> dict[str, tuple[NodeInfo, float]]:
        """Every valid, unexpired record: node id -> (its info, seconds until it expires)."""
        return {r.info.node_id: (r.info, r.expires_in_s) for r in self.records()}

    def records(self) -> list[SwarmRecord]:
        """Every valid, unexpired record, with its age; invalid ones are logged and left out.
        Per node the newest read (``NewestRecords``); a node that left is left out."""
        from hivemind.utils import get_dht_time

        found = self._read()
        if found is None or not isinstance(found.value, dict):
            self._newest.forget_expired(set())
            return []
        now = get_dht_time()
        records: list[SwarmRecord] = []
        for subkey, entry in found.value.items():
            if entry.expiration_time <= now:
                continue
            try:
                record = self._record(str(subkey), entry.value)
                info = info_of(record, self._model, self._protocol)
            except RecordError as exc:
                self._ignore(str(subkey), str(exc))
                continue
            if info.node_id != subkey:
                self._ignore(str(subkey), f"the record names node {info.node_id!r}")
                continue
            checked: dict[str, Any] = record  # type: ignore[assignment]  # info_of checked it
            expires_in = entry.expiration_time - now
            ttl = record_ttl(checked)
            age = max(0.0, ttl - expires_in) if ttl > 0 else None
            read = SwarmRecord(info, expires_in, age)
            chosen = self._newest.choose(record_seq(checked), record_leaving(checked), read, ttl)
            if chosen is not None:
                records.append(chosen)
        self._newest.forget_expired({str(subkey) for subkey in found.value})
        return sorted(records, key=lambda r: (r.info.layers.start, r.info.node_id))

    def left(self) -> set[str]:
        """Nodes whose newest record, as ``records`` last read it, says they left."""
        return self._newest.left()

    def _ignore(self, node_id: str, reason: str) -> None:
        """Logs why once per node; the node ids (subkeys any peer may write) are bounded in
        number and in the length logged."""
        if self._ignored.get(node_id) == reason:
            self._ignored.move_to_end(node_id)
            return
        self._ignored[node_id] = reason
        self._ignored.move_to_end(node_id)
        while len(self._ignored) > MAX_IGNORED_NODES:
            self._ignored.popitem(last=False)
        shown = node_id if len(node_id) <= 80 else f"{node_id[:80]}... ({len(node_id)} chars)"
        logger.warning("ignoring the DHT record of node %s: %s", shown, reason)

    def shutdown(self) -> None:
        if self._dht is not None:
            self._dht.shutdown()
            self._dht = None
