"""hivemind's hook on a member's DHT node (see molink.security.sealing for the why).

Kept apart from the sealing itself so that importing the records' format does not import
hivemind, which only nodes that join a DHT need.
"""

from __future__ import annotations

import logging

import msgpack
from hivemind.dht.validation import DHTRecord, RecordValidatorBase

from molink.security.limits import RefusalLog
from molink.security.sealing import RecordSeal

logger = logging.getLogger(__name__)

# A store may expire a little after the signed expiry (clocks differ), never long after:
# otherwise an old, still-valid copy could outlive the node's renewals in hivemind's storage.
_EXPIRY_SLACK_S = 5.0


class SealedRecordValidator(RecordValidatorBase):
    """hivemind's hook on a member's DHT node: only sealed, signed, unexpired, fresh records
    of members, each under its own node id as subkey, are stored or accepted from peers."""

    def __init__(self, seal: RecordSeal) -> None:
        self._seal = seal
        self._refusals = RefusalLog(logger)

    def validate(self, record: DHTRecord) -> bool:
        try:
            reason = self._reason(record)
        except Exception as exc:  # a validator that raises would fail the DHT's whole call
            reason = f"unreadable ({type(exc).__name__})"
        if reason:
            self._refusals.refused(None, f"the DHT refused a record: {reason}")
            return False
        return True

    def _reason(self, record: DHTRecord) -> str:
        subkey = msgpack.unpackb(record.subkey, raw=False)
        if not isinstance(subkey, str):
            return "not a node's record (no node id as subkey)"
        value = msgpack.unpackb(record.value, raw=False)
        signed, reason = self._seal.open(value, subkey)
        if signed is None:
            return f"node {subkey}: {reason}"
        # Written so that NaN fails too: the store's expiry is not signed, and a NaN one
        # compares false with every time, so hivemind's storage would never expire it.
        if not record.expiration_time <= signed.expires_at + _EXPIRY_SLACK_S:
            return f"node {subkey}: kept past its signed expiry ({record.expiration_time!r})"
        return ""

    @property
    def priority(self) -> int:
        return 10  # checked first: nothing else needs to look at an outsider's record
