"""What a node remembers of the releases that reached it apart from the steps.

A release sent out of band (the head's ``Release`` call after a node was lost, or to a
node it takes back) names the first step not yet submitted at the loss: the head failed
every older step in flight through the lost node and replays its sequences with newer
ones. Such an older step may still reach this node after the release: the node before it
held it, or this node was frozen with it queued. Computing it would start or grow a copy
that nothing frees any more while the head renews its lease (its release came first), or
write into the copy a replay started here. So for each sequence such a release named the
node keeps the release's step, and drops older steps that name the sequence.

In-band releases need no record: they follow on one stream the steps sent before them.
Step ids grow per head (replays get new ones); a head whose lease lapses is forgotten, as
a restarted head counts its steps anew.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from molink.errors import ProtocolError
from molink.step import StepPlan

# Records kept, the oldest forgotten first: a head may send releases naming any sequence
# ids, so one record per id ever named would grow without bound. A record matters only
# while a step sent before the loss may still arrive (seconds, at most a lease).
MAX_RELEASE_BOUNDS = 65_536


class ReleaseBounds:
    """Thread-safe (the compute thread writes and reads; a lapse may come from it too)."""

    def __init__(self, max_records: int = MAX_RELEASE_BOUNDS) -> None:
        self._max_records = max_records
        self._lock = threading.Lock()
        self._bounds: OrderedDict[tuple[str, int], int] = OrderedDict()

    def note(self, head_id: str, seq_ids: tuple[int, ...], before_step: int) -> None:
        """A release of ``head_id``'s ``seq_ids`` named ``before_step``."""
        with self._lock:
            for seq_id in seq_ids:
                key = (head_id, seq_id)
                self._bounds[key] = max(self._bounds.get(key, before_step), before_step)
                self._bounds.move_to_end(key)
            while len(self._bounds) > self._max_records:
                self._bounds.popitem(last=False)

    def check(self, head_id: str, plan: StepPlan) -> None:
        """Raise ProtocolError when ``plan`` names a sequence that an out-of-band release
        came for first, with a later step: the head failed ``plan`` before sending it."""
        named = {s.seq_id for s in plan.scheduled} | {n.seq_id for n in plan.new_sequences}
        with self._lock:
            bounds = [(s, self._bounds.get((head_id, s), -1)) for s in sorted(named)]
        for seq_id, bound in bounds:
            if plan.step_id < bound:
                raise ProtocolError(
                    f"it is older than the release of sequence {seq_id} up to step {bound}, "
                    "which came first (the head failed it before sending that release)"
                )

    def forget_head(self, head_id: str) -> None:
        with self._lock:
            for key in [k for k in self._bounds if k[0] == head_id]:
                del self._bounds[key]
