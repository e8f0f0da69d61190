"""Spot checks of untrusted results: comparing two replicas' answers to the same step.

Two replicas of one span, given the same input, compute the same function; they may still
differ by rounding (another batch composition, another kernel order, the wire's dtype).
The tolerance is derived from the coarsest of the dtypes involved: ``ULPS`` units in the
last place of that dtype, relative to the size of the values (``tolerance_for``). What is
compared:

* hidden states (the output of a span): elementwise, within the tolerance relative to the
  largest magnitude of the reference;
* sampled tokens: exactly, for sequences whose sampling is deterministic (greedy, or
  seeded); the logprob of the sampled token, when both answers carry one, within the
  tolerance.

A disagreement names two nodes, either of which may be the liar; ``molink.security.bans``
decides which one to ban. ``SpotChecker`` ties it together: which steps to re-run (a random
fraction), on which replica, and what the two answers prove.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from molink.errors import InvalidParameterError
from molink.security.bans import Verdicts
from molink.step import SampledToken, StepResult

ULPS = 16  # rounding differences between replicas stay within a few units in the last place
ULPS_LAYERS = 16  # ULPS covers a span of this many layers (tolerance_for)
_INT8_STEP = 2.0 / 255.0  # int8 wire: one quantization step of a row scaled to [-1, 1]


@dataclass(frozen=True)
class Answer:
    """One replica's answer to a checked step: its ``result`` (sampled tokens, for a
    route's last node) and, when the next node could tell, the ``hidden`` rows of the
    checked sequences it sent on."""

    node_id: str
    result: StepResult
    hidden: torch.Tensor | None = None


@dataclass(frozen=True)
class Tolerance:
    relative: float

    def allows(self, difference: float, magnitude: float) -> bool:
        return difference <= self.relative * max(1.0, magnitude)


def tolerance_for(*dtypes: torch.dtype | str, layers: int = 1) -> Tolerance:
    """The tolerance for values that passed through every one of ``dtypes`` (compute,
    KV cache, wire): ``ULPS`` steps of the coarsest, for a span of up to ``ULPS_LAYERS``
    layers, growing in proportion beyond. Measured on float32 Llama-shaped spans of 4 to
    31 layers against float64: the residual stream's last row was 6 to 9 steps of its
    largest value off; two honest replicas may each be that far off."""
    steps = [_step(d) for d in dtypes]
    if not steps:
        raise ValueError("tolerance_for needs at least one dtype")
    return Tolerance(ULPS * max(steps) * max(1.0, layers / ULPS_LAYERS))


def _step(dtype: torch.dtype | str) -> float:
    if isinstance(dtype, str):
        if dtype == "int8":
            return _INT8_STEP
        dtype = getattr(torch, dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}")
    if dtype == torch.int8:
        return _INT8_STEP
    if not dtype.is_floating_point:
        raise ValueError(f"{dtype} is not a floating-point dtype")
    return float(torch.finfo(dtype).eps)


def compare_hidden(reference: torch.Tensor, other: torch.Tensor, tolerance: Tolerance) -> str:
    """ "" when the two outputs of a span agree, else how they differ."""
    if reference.shape != other.shape:
        return f"hidden states of shape {tuple(other.shape)}, expected {tuple(reference.shape)}"
    a = reference.to(torch.float32)
    b = other.to(torch.float32)
    if not bool(torch.isfinite(b).all()):
        return "hidden states that are not finite"
    difference = float((a - b).abs().max()) if a.numel() else 0.0
    magnitude = float(a.abs().max()) if a.numel() else 0.0
    if tolerance.allows(difference, magnitude):
        return ""
    return (
        f"hidden states differ by up to {difference:.3g} (values up to {magnitude:.3g}; "
        f"allowed {tolerance.relative:.3g} relative)"
    )


def compare_sampled(
    reference: StepResult,
    other: StepResult,
    deterministic: frozenset[int],
    tolerance: Tolerance,
) -> str:
    """ "" when two results of one step agree on every sequence they both sampled; tokens
    are compared only for the sequences in ``deterministic`` (greedy or seeded)."""
    if reference.error or other.error:
        return ""  # a failed step is the failure handling's business, not a disagreement
    theirs = {s.seq_id: s for s in other.sampled}
    for mine in reference.sampled:
        peer = theirs.get(mine.seq_id)
        if peer is None or mine.error or peer.error:
            continue
        reason = _compare_token(mine, peer, mine.seq_id in deterministic, tolerance)
        if reason:
            return f"sequence {mine.seq_id}: {reason}"
    return ""


def _compare_token(
    mine: SampledToken, peer: SampledToken, deterministic: bool, tolerance: Tolerance
) -> str:
    if deterministic and mine.token_id != peer.token_id:
        return f"token {peer.token_id}, expected {mine.token_id}"
    if mine.token_id != peer.token_id or mine.logprob is None or peer.logprob is None:
        return ""
    if not math.isfinite(peer.logprob):
        return f"logprob {peer.logprob} of token {peer.token_id}"
    if tolerance.allows(abs(mine.logprob - peer.logprob), abs(mine.logprob)):
        return ""
    return f"logprob {peer.logprob:.6g} of token {peer.token_id}, expected {mine.logprob:.6g}"


class SpotChecker:
    """Which steps to re-run (a random fraction), on which replica, and what the two
    answers prove (``molink.security.bans.Verdicts``)."""

    def __init__(
        self,
        fraction: float,
        verdicts: Verdicts,
        tolerance: Tolerance,
        rng: random.Random | None = None,
    ) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise InvalidParameterError("molink_verify_fraction", f"{fraction} must be in [0, 1]")
        self.fraction = fraction
        self.verdicts = verdicts
        self.tolerance = tolerance
        self._rng = rng or random.Random()

    def should_check(self) -> bool:
        return self.fraction > 0 and self._rng.random() < self.fraction

    def pick_index(self, count: int) -> int:
        return self._rng.randrange(count)

    def second_replica(self, node_id: str, replicas: Sequence[str]) -> str | None:
        """Another replica of ``node_id``'s span to re-run on (None: there is none)."""
        bans = self.verdicts.bans
        others = [r for r in replicas if r != node_id and bans.reason(r) is None]
        return self._rng.choice(sorted(others)) if others else None

    def judge_answers(
        self,
        first: Answer,
        second: Answer,
        deterministic: frozenset[int],
        tolerance: Tolerance | None = None,
    ) -> str:
        """One verdict on two replicas' answers to one step: their hidden rows (when both
        are known), then their sampled tokens; "" when they agree, else why not."""
        tolerance = tolerance or self.tolerance
        for answer in (first, second):
            malformed = _malformed(answer.hidden) if answer.hidden is not None else ""
            malformed = malformed or _malformed(answer.result)
            if malformed:
                self.verdicts.malformed(answer.node_id, malformed)
                return malformed
        reason = ""
        if first.hidden is not None and second.hidden is not None:
            reason = compare_hidden(first.hidden, second.hidden, tolerance)
        if not reason:
            reason = compare_sampled(first.result, second.result, deterministic, tolerance)
        if reason:
            self.verdicts.disagreed(first.node_id, second.node_id, reason)
        else:
            self.verdicts.agreed(first.node_id, second.node_id)
        return reason


def _malformed(answer: torch.Tensor | StepResult) -> str:
    if isinstance(answer, torch.Tensor):
        if answer.is_floating_point() and not bool(torch.isfinite(answer).all()):
            return "hidden states that are not finite"
        return ""
    for token in answer.sampled:
        if token.logprob is not None and math.isnan(token.logprob):
            return f"a NaN logprob for sequence {token.seq_id}"
    return ""
