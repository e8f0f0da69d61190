"""Who lied: turning spot-check disagreements into bans.

A disagreement between two replicas of one span implicates both: either may be the liar.
A node is banned when the evidence singles it out:

* it disagreed with two distinct replicas that agreed with each other (two honest
  witnesses outvote one liar; a liar that disagrees with one honest node alone is only a
  suspect), or
* its answer was malformed on its own (not finite, wrong shape): no witness is needed.

With only two replicas of a span nobody can be singled out; the disagreement is logged and
counted, and both stay suspects. Bans are kept with their reason, logged once, and exported
for ``/metrics`` and ``molink status``; the head routes around banned nodes and ignores
their records.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass

logger = logging.getLogger(__name__)

_MAX_PAIRS = 100_000  # bounded memory: the oldest observations are forgotten first


@dataclass(frozen=True)
class Ban:
    node_id: str
    reason: str
    at: float  # time.time()


class BanList:
    """Thread-safe: the checker bans, routing and discovery read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bans: dict[str, Ban] = {}
        self._agreements = 0
        self._disagreements = 0

    def ban(self, node_id: str, reason: str) -> bool:
        """True when ``node_id`` is newly banned."""
        with self._lock:
            if node_id in self._bans:
                return False
            self._bans[node_id] = Ban(node_id, reason, time.time())
        logger.error("banning node %s from routes: %s", node_id, reason)
        return True

    def reason(self, node_id: str) -> str | None:
        with self._lock:
            ban = self._bans.get(node_id)
        return None if ban is None else ban.reason

    def snapshot(self) -> list[Ban]:
        with self._lock:
            return sorted(self._bans.values(), key=lambda b: b.at)

    def count(self, agreed: bool) -> None:
        with self._lock:
            if agreed:
                self._agreements += 1
            else:
                self._disagreements += 1

    def counts(self) -> tuple[int, int]:
        """(agreements, disagreements) between pairs of answers so far."""
        with self._lock:
            return self._agreements, self._disagreements

    def metric_lines(self) -> list[str]:
        with self._lock:
            bans = list(self._bans.values())
            agreements, disagreements = self._agreements, self._disagreements
        lines = [
            "# HELP molink_spot_checks_total Steps re-run on a second replica, by outcome.",
            "# TYPE molink_spot_checks_total counter",
            f'molink_spot_checks_total{{outcome="agreed"}} {agreements}',
            f'molink_spot_checks_total{{outcome="disagreed"}} {disagreements}',
            "# HELP molink_banned_nodes Nodes banned from routes by spot checks.",
            "# TYPE molink_banned_nodes gauge",
            f"molink_banned_nodes {len(bans)}",
            "# HELP molink_node_banned A banned node, with the reason (value: ban time).",
            "# TYPE molink_node_banned gauge",
        ]
        for ban in bans:
            lines.append(
                f'molink_node_banned{{node="{_label(ban.node_id)}",reason="{_label(ban.reason)}"}} '
                f"{ban.at:.3f}"
            )
        return lines


def _label(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ")


class Verdicts:
    """Agreements and disagreements between replicas of one span, and the bans they prove."""

    def __init__(self, bans: BanList) -> None:
        self.bans = bans
        self._lock = threading.Lock()
        self._agreed: set[frozenset[str]] = set()
        self._disagreed: dict[frozenset[str], str] = {}  # pair -> the first reason seen

    def agreed(self, a: str, b: str) -> None:
        self.bans.count(agreed=True)
        with self._lock:
            self._remember(self._agreed, frozenset((a, b)))
            candidates = [n for pair in self._disagreed for n in pair]
        self._judge(set(candidates))

    def disagreed(self, a: str, b: str, reason: str) -> None:
        """``b``'s answer differs from ``a``'s (``reason`` says how)."""
        self.bans.count(agreed=False)
        logger.warning("spot check: nodes %s and %s disagree: %s", a, b, reason)
        with self._lock:
            pair = frozenset((a, b))
            if pair not in self._disagreed:
                if len(self._disagreed) >= _MAX_PAIRS:
                    self._disagreed.pop(next(iter(self._disagreed)))
                self._disagreed[pair] = reason
        self._judge({a, b})

    def malformed(self, node_id: str, reason: str) -> None:
        self.bans.count(agreed=False)
        self.bans.ban(node_id, f"spot check: its answer is malformed: {reason}")

    def _remember(self, pairs: set[frozenset[str]], pair: frozenset[str]) -> None:
        if len(pairs) >= _MAX_PAIRS:
            pairs.pop()
        pairs.add(pair)

    def _judge(self, nodes: set[str]) -> None:
        for node in sorted(nodes):
            proof = self._witnesses(node)
            if proof is not None:
                p, q, reason = proof
                self.bans.ban(
                    node,
                    f"spot check: disagreed with replicas {p} and {q}, which agree with each "
                    f"other ({reason})",
                )

    def _witnesses(self, node: str) -> tuple[str, str, str] | None:
        with self._lock:
            peers = {
                next(iter(pair - {node})): reason
                for pair, reason in self._disagreed.items()
                if node in pair
            }
            agreed = set(self._agreed)
        banned = {b.node_id for b in self.bans.snapshot()}
        honest = sorted(p for p in peers if p not in banned)
        for i, p in enumerate(honest):
            for q in honest[i + 1 :]:
                if frozenset((p, q)) in agreed:
                    return p, q, peers[p]
        return None
