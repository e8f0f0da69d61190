"""Checked sequences' tokens held until their step's verdict.

A checked step's primary result goes to the engine at once, marked: the tokens it sampled
for checked sequences (StepResult.held_seq_ids) wait in the scheduler, and those
sequences are not scheduled again, until the step is judged (molink.pipeline.spot_judge).
The other sequences of the step, and every unchecked step, go on as if there were no
checks. A token stands if its node was not convicted; a convicted node's tokens are
dropped and their sequences replay from their last verified token on other routes
(molink.engine.recovery.TokenVerdict). A checked sequence therefore waits, each step,
for its re-runs and the next node's witness answer: that is what checking costs it.

A check that fails (its route lost a node, a node refused the re-run, judging fell
behind) or does not answer within ``wait_s`` releases the tokens it held, unverified and
counted. Re-checking on another replica instead would first need the sequence's whole
history prefilled on a new check route (stages keep KV per sequence), often costlier
than the checks themselves, and there may be no other unbanned replica; a liar cannot
make its own checks fail (the check route runs its span elsewhere), and a check is a
sample, not a proof owed for every token: the sequence's next steps are still checked
on another check route (molink.pipeline.head_spot_checks).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from molink.engine.recovery import TokenVerdict

logger = logging.getLogger(__name__)

StepKey = tuple[int, int]  # (step id, micro-batch)

OUTCOMES = ("verified", "dropped", "released_unchecked")


@dataclass(frozen=True)
class _Hold:
    seq_ids: tuple[int, ...]
    primary_node: str
    deadline: float


class HeldTokens:
    """Thread-safe: results arrive on receiving threads, verdicts on the judging thread,
    the engine thread takes them."""

    def __init__(self, wait_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._wait_s = wait_s
        self._clock = clock
        self._lock = threading.Lock()
        self._holds: dict[StepKey, _Hold] = {}
        self._verdicts: list[TokenVerdict] = []
        self._counts = dict.fromkeys(OUTCOMES, 0)  # held tokens, by how they were let go

    def hold(self, key: StepKey, seq_ids: tuple[int, ...], primary_node: str) -> None:
        if not seq_ids:
            return
        with self._lock:
            self._holds[key] = _Hold(seq_ids, primary_node, self._clock() + self._wait_s)

    def judged(self, key: StepKey, primary_convicted: bool) -> None:
        """The step was judged: its primary's tokens stand unless it was convicted."""
        self._let_go(key, keep=not primary_convicted, outcome=None)

    def unchecked(self, key: StepKey, why: str) -> None:
        """The step will not be judged: its tokens go to their users unverified."""
        if self._let_go(key, keep=True, outcome="released_unchecked"):
            logger.warning("spot checks: step %d released unverified: %s", key[0], why)

    def node_left(self, node_id: str, keys: list[StepKey]) -> None:
        """``node_id`` left while ``keys`` waited for a re-run it was part of: the tokens
        of a primary that left are dropped (its sequences replay anyway), the others go
        unverified."""
        for key in keys:
            with self._lock:
                hold = self._holds.get(key)
            if hold is not None and hold.primary_node == node_id:
                self._let_go(key, keep=False, outcome=None)
            elif hold is not None:
                self.unchecked(key, f"node {node_id} of its check left")

    def take(self) -> list[TokenVerdict]:
        """The verdicts reached since the last call; holds past their wait are released
        (unverified) first."""
        now = self._clock()
        with self._lock:
            overdue = [k for k, h in self._holds.items() if h.deadline <= now]
        for key in overdue:
            self.unchecked(key, f"no verdict within {self._wait_s:.0f} s")
        with self._lock:
            verdicts, self._verdicts = self._verdicts, []
        return verdicts

    def __len__(self) -> int:
        with self._lock:
            return len(self._holds)

    def metric_lines(self) -> list[str]:
        with self._lock:
            counts = dict(self._counts)
        lines = [
            "# HELP molink_spot_check_held_tokens_total Tokens of checked sequences held for "
            "their verdict, by how they were let go (released_unchecked: the check failed or "
            "did not answer in time).",
            "# TYPE molink_spot_check_held_tokens_total counter",
        ]
        lines += [
            f'molink_spot_check_held_tokens_total{{outcome="{k}"}} {v}' for k, v in counts.items()
        ]
        return lines

    def _let_go(self, key: StepKey, keep: bool, outcome: str | None) -> bool:
        with self._lock:
            hold = self._holds.pop(key, None)
            if hold is None:
                return False
            outcome = outcome or ("verified" if keep else "dropped")
            self._counts[outcome] += len(hold.seq_ids)
            self._verdicts.extend(TokenVerdict(s, key[0], keep) for s in hold.seq_ids)
        return True
