"""The compute thread of a node: runs the StageExecutor over jobs, heads taking turns.

Receiving threads decode and validate messages, then queue jobs here; outputs leave
through callbacks that only enqueue on senders, so the executor never waits on a socket.
The worker also keeps which sequences each head has introduced on this stage (to reject
plans naming unknown ones) and notices when input stops while sequences are active.

Steps that queue up behind each other (this stage is the pipeline's slowest, or several
micro-batches arrived at once) run in one pass when the executor can (``execute_many``):
on memory-bound hardware a decode pass costs nearly the same for 10 rows as for 30, so
the slowest stage gains exactly when it needs to. Outputs still leave one per step.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from molink.errors import PipelineError, ProtocolError
from molink.kv_cache.stage_pool import KVRoomError
from molink.pipeline.fair_queue import HeadFairQueue, QueueFullError
from molink.pipeline.leases import LeaseTable
from molink.pipeline.release_bounds import ReleaseBounds
from molink.placement.route import Route
from molink.stage.protocol import StageExecutor
from molink.step import FailureKind, StepPlan, StepResult
from molink.transport.generated import molink_pb2 as pb
from molink.transport.validate import check_known_sequences

if TYPE_CHECKING:
    from molink.pipeline.head_spot_checks import Mirror

logger = logging.getLogger(__name__)

_IDLE_TICK_S = 0.2
# Most tokens the steps computed together in one pass may carry (see ComputeWorker._coalesce).
COALESCE_MAX_TOKENS = 1024


@dataclass
class StepJob:
    """One step to compute. ``trusted`` plans come from this node's own scheduler."""

    head_id: str
    route: Route
    plan: StepPlan
    hidden: torch.Tensor | None
    trace: list[pb.HopTrace] = field(default_factory=list)  # hops before this one
    bytes_received: int = 0
    received_at: float = field(default_factory=time.monotonic)
    trusted: bool = False
    # The head's spot checks: rows of the output to send along a check route as well
    # (molink.pipeline.head_spot_checks.Mirror).
    mirror: Mirror | None = None


@dataclass
class ReleaseJob:
    head_id: str
    route: Route | None  # None: a release for this node only
    seq_ids: tuple[int, ...]
    propagate: bool  # an in-band release travels on to the next node of its route
    # Set: free only copies started by a plan of a step below this one. A release sent
    # out of band (after a node was lost) may arrive after a replay restarted the
    # sequence here; the replay's copy must stay.
    started_before_step: int | None = None


@dataclass
class StepOutput:
    """What the executor made of a job, with this node's hop record appended."""

    job: StepJob
    output: torch.Tensor | StepResult
    trace: list[pb.HopTrace]


class ComputeWorker:
    """Owns the executor; every call into it happens on this worker's thread."""

    def __init__(
        self,
        executor: StageExecutor,
        node_id: str,
        on_output: Callable[[StepOutput], None],
        on_error: Callable[[StepJob, str, FailureKind], None],
        on_release: Callable[[ReleaseJob], None],
        max_queued: int,
        upstream_stall_s: float,
        max_sequences_per_head: int = 4096,
        leases: LeaseTable | None = None,
        on_lapse: Callable[[str], None] | None = None,
        max_sequences_per_node: int | None = None,
        max_queued_per_node: int | None = None,
    ) -> None:
        self._executor = executor
        self._max_sequences_per_head = max_sequences_per_head
        # Any member can make itself fresh head ids: the node-wide bounds hold whatever
        # heads the steps name (None: not bounded, for a head's own stage).
        self._max_sequences_per_node = max_sequences_per_node
        self._node_id = node_id
        self._on_output = on_output
        self._on_error = on_error
        self._on_release = on_release
        # Heads take turns; each keeps its own order (molink.pipeline.fair_queue).
        self._jobs: HeadFairQueue[StepJob | ReleaseJob] = HeadFairQueue(
            max_per_head=max_queued, max_total=max_queued_per_node
        )
        self._stall_after_s = upstream_stall_s
        self.leases = leases  # None: a head's own stage, whose steps are its own
        self._on_lapse = on_lapse
        self._known: dict[str, set[int]] = {}
        # head -> sequence -> the step whose plan last (re)started it here
        self._started: dict[str, dict[int, int]] = {}
        self._release_bounds = ReleaseBounds()  # out-of-band releases' steps, per sequence
        self._stop = threading.Event()
        self._last_input = time.monotonic()
        self._stalled = False
        self.steps_processed = 0
        self.steps_failed = 0
        self.throughput = ThroughputMeter()
        self._thread = threading.Thread(target=self._run, name=f"compute-{node_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def submit(self, job: StepJob | ReleaseJob, timeout: float) -> None:
        """Queue a job; raise PipelineError if the queue stays full for ``timeout``."""
        try:
            self._jobs.put(job, timeout=timeout)
        except QueueFullError as exc:
            raise PipelineError(
                f"stage {self._node_id} is overloaded: {exc} for more than {timeout:.0f}s"
            ) from None

    @property
    def queued(self) -> int:
        return self._jobs.qsize()

    @property
    def active_sequences(self) -> int:
        return sum(len(ids) for ids in self._known.values())

    @property
    def stall_message(self) -> str | None:
        """Set while input has stopped for too long with sequences active."""
        if not self._stalled:
            return None
        waited = time.monotonic() - self._last_input
        return f"no input from upstream for {waited:.0f}s while {self.active_sequences} sequence(s) are active"

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._next_job()
            self._expire_leases()  # before the job renews: a frozen node wakes up fresh
            if job is None:
                self._check_stall()
                continue
            self._note_input()
            if self.leases is not None:
                self.leases.renew(job.head_id)
            try:
                if isinstance(job, ReleaseJob):
                    self._release(job)
                else:
                    self._steps(self._coalesce(job))
            except Exception:  # never let one bad job end the compute thread
                logger.exception("stage %s: unexpected error in the compute loop", self._node_id)

    def _next_job(self) -> StepJob | ReleaseJob | None:
        return self._jobs.get(timeout=_IDLE_TICK_S)

    def _coalesce(self, first: StepJob) -> list[StepJob]:
        """``first`` and the steps queued right behind it for the same head, while they
        fit ``COALESCE_MAX_TOKENS``: a stage that falls behind computes the micro-batches
        waiting for it in one pass (disjoint sequences, so the result is the same) and
        streams its weights once for all of them. Stops at anything else, keeping order;
        this pass is the head's turn, the next goes to another head."""
        jobs, tokens = [first], first.plan.num_tokens

        def fits(job: StepJob | ReleaseJob) -> bool:
            return isinstance(job, StepJob) and tokens + job.plan.num_tokens <= COALESCE_MAX_TOKENS

        while (job := self._jobs.take_next_if(first.head_id, fits)) is not None:
            assert isinstance(job, StepJob)
            jobs.append(job)
            tokens += job.plan.num_tokens
        return jobs

    def _expire_leases(self) -> None:
        if self.leases is None:
            return
        for head_id in self.leases.lapsed():
            known = self._forget_head(head_id)
            logger.warning(
                "stage %s: the lease of head %s lapsed; freeing its %d sequence(s)",
                self._node_id,
                head_id,
                len(known),
            )
            try:
                self._executor.release(sorted(known), head_id)
            except Exception:
                logger.exception("stage %s: freeing head %s failed", self._node_id, head_id)
            if self._on_lapse is not None:
                self._on_lapse(head_id)

    def _forget_head(self, head_id: str) -> set[int]:
        """Forget what this stage knows of ``head_id`` (its lease lapsed); returns the
        sequences it held here."""
        self._started.pop(head_id, None)
        self._release_bounds.forget_head(head_id)
        return self._known.pop(head_id, set())

    def _is_stale(self, job: StepJob) -> bool:
        """A step received before its head's lease lapsed (this node was frozen, or the
        head died): the head has moved its sequences, so computing it could only leave
        stale KV. A step that merely queued long on a busy node is not stale: the head's
        health checks keep renewing the lease meanwhile."""
        if self.leases is None or not self.leases.lapsed_since(job.head_id, job.received_at):
            return False
        self.steps_failed += 1
        waited = time.monotonic() - job.received_at
        self._on_error(
            job,
            f"stage {self._node_id} dropped {_step_name(job)}: it arrived {waited:.0f}s ago, "
            "before its head's lease lapsed",
            FailureKind.DEADLINE,
        )
        return True

    def _steps(self, jobs: list[StepJob]) -> None:
        admitted = []
        for job in jobs:
            if self._is_stale(job):
                continue
            try:
                self._admit(job)
            except ProtocolError as exc:
                self._reject(job, exc, FailureKind.REJECTED)
                plan = job.plan
                if plan.finished_seq_ids:  # the executor never saw them: free them here
                    self._release(
                        ReleaseJob(
                            job.head_id, job.route, plan.finished_seq_ids, True, plan.step_id
                        )
                    )
                continue
            admitted.append(job)
        if not admitted:
            return
        started = time.monotonic()
        try:
            outputs = self._execute(admitted)
        except Exception as exc:
            for job in admitted:
                self._fail(job, exc)
                self._pass_on_releases(job)
            return
        elapsed = time.monotonic() - started
        total_tokens = sum(max(1, job.plan.num_tokens) for job in admitted)
        self.throughput.add(total_tokens, elapsed)
        for job, output in zip(admitted, outputs, strict=True):
            if isinstance(output, KVRoomError):
                self._reject(job, output, FailureKind.KV_FULL)
                self._pass_on_releases(job)
                continue
            if isinstance(output, ProtocolError):
                self._reject(job, output, FailureKind.REJECTED)
                self._pass_on_releases(job)
                continue
            self.steps_processed += 1
            hop = pb.HopTrace(
                node_id=self._node_id,
                bytes_received=job.bytes_received,
                queue_s=max(0.0, started - job.received_at),
                # A shared pass is charged to its steps by their tokens.
                compute_s=elapsed * max(1, job.plan.num_tokens) / total_tokens,
            )
            self._on_output(StepOutput(job=job, output=output, trace=[*job.trace, hop]))

    def _execute(
        self, jobs: list[StepJob]
    ) -> list[torch.Tensor | StepResult | ProtocolError | KVRoomError]:
        steps = [(job.plan, job.hidden) for job in jobs]
        return self._executor.execute_many(steps, jobs[0].head_id)

    def _pass_on_releases(self, job: StepJob) -> None:
        """A step that fails here never reaches the nodes after this one, yet the head has
        forgotten the finished sequences it carries: their release goes on in band (after
        the steps already sent there, before any later one restarting them)."""
        plan = job.plan
        if plan.finished_seq_ids:
            self._on_release(
                ReleaseJob(job.head_id, job.route, plan.finished_seq_ids, True, plan.step_id)
            )

    def _reject(self, job: StepJob, exc: Exception, kind: FailureKind) -> None:
        self.steps_failed += 1
        self._on_error(job, f"stage {self._node_id} rejected {_step_name(job)}: {exc}", kind)

    def _fail(self, job: StepJob, exc: Exception) -> None:
        self.steps_failed += 1
        logger.exception("stage %s failed on %s", self._node_id, _step_name(job))
        self._on_error(
            job,
            f"stage {self._node_id} failed on {_step_name(job)}: {type(exc).__name__}: {exc}",
            FailureKind.NODE_ERROR,
        )

    def _admit(self, job: StepJob) -> None:
        """Track the head's sequences as the plan says; reject untrusted plans naming
        strangers. Trusted plans are tracked too, so that the head's health reports the
        sequences its own stage holds."""
        self._release_bounds.check(job.head_id, job.plan)  # older than a release here?
        known = self._known.setdefault(job.head_id, set())
        started = self._started.setdefault(job.head_id, {})
        plan = job.plan = _keeping_later_copies(job.plan, started)
        known.difference_update(plan.finished_seq_ids)
        for seq_id in plan.finished_seq_ids:
            started.pop(seq_id, None)
        if not job.trusted:
            check_known_sequences(plan, known)
            self._check_sequence_cap(job, known)
        known.update(n.seq_id for n in plan.new_sequences)
        started.update((n.seq_id, plan.step_id) for n in plan.new_sequences)

    def _check_sequence_cap(self, job: StepJob, known: set[int]) -> None:
        """One head may not fill a stage with sequences that other heads then lack."""
        held = len(known | {n.seq_id for n in job.plan.new_sequences})
        if held > self._max_sequences_per_head:
            raise ProtocolError(
                f"head {job.head_id} would hold {held} sequences on stage {self._node_id}; "
                f"one head may hold at most {self._max_sequences_per_head}"
            )
        limit = self._max_sequences_per_node
        total = self.active_sequences - len(known) + held
        if limit is not None and total > limit:
            raise ProtocolError(
                f"all heads would hold {total} sequences on stage {self._node_id}; "
                f"they may hold at most {limit} together (max_sequences_per_node)"
            )

    def _release(self, job: ReleaseJob) -> None:
        if job.route is None and job.started_before_step is not None:  # out of band
            self._release_bounds.note(job.head_id, job.seq_ids, job.started_before_step)
        seq_ids = self._releasable(job)
        known = self._known.get(job.head_id)
        if known is not None:
            known.difference_update(seq_ids)
        started = self._started.get(job.head_id, {})
        for seq_id in seq_ids:
            started.pop(seq_id, None)
        try:
            self._executor.release(list(seq_ids), job.head_id)
        except Exception:
            logger.exception(
                "stage %s: release of %d sequences failed", self._node_id, len(job.seq_ids)
            )
        self._on_release(job)

    def _releasable(self, job: ReleaseJob) -> tuple[int, ...]:
        """The sequences ``job`` frees: all it names, or with ``started_before_step`` only
        those whose copy here is older than that step."""
        if job.started_before_step is None:
            return job.seq_ids
        started = self._started.get(job.head_id, {})
        kept = [s for s in job.seq_ids if started.get(s, -1) >= job.started_before_step]
        if kept:
            logger.info(
                "stage %s: keeping %d sequence(s) of head %s that a later plan restarted",
                self._node_id,
                len(kept),
                job.head_id,
            )
        return tuple(s for s in job.seq_ids if s not in kept)

    def _note_input(self) -> None:
        self._last_input = time.monotonic()
        if self._stalled:
            logger.info("stage %s: upstream input resumed", self._node_id)
            self._stalled = False

    def _check_stall(self) -> None:
        waited = time.monotonic() - self._last_input
        active = self.active_sequences
        if active == 0 or waited < self._stall_after_s or self._stalled:
            return
        self._stalled = True
        logger.warning("stage %s: %s", self._node_id, self.stall_message)


class ThroughputMeter:
    """Tokens per second of compute, as announced in the node's record: token and second
    totals both decay by the same factor per pass, so the rate follows the recent mix of
    prefills and decodes rather than the node's whole history."""

    DECAY = 0.9

    def __init__(self) -> None:
        self._tokens = 0.0
        self._seconds = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        self._tokens = self._tokens * self.DECAY + tokens
        self._seconds = self._seconds * self.DECAY + max(0.0, seconds)

    @property
    def tokens_per_s(self) -> float:
        """0.0 until a pass has been timed."""
        return self._tokens / self._seconds if self._seconds > 0 else 0.0


def _keeping_later_copies(plan: StepPlan, started: dict[int, int]) -> StepPlan:
    """``plan`` without the finished sequences whose copy here a later plan started: a
    sequence released on one route and sent again on another reaches a node they share
    by two streams, and the plan carrying the release may come second."""
    later = {s for s in plan.finished_seq_ids if started.get(s, -1) > plan.step_id}
    if not later:
        return plan
    kept = tuple(s for s in plan.finished_seq_ids if s not in later)
    return dataclasses.replace(plan, finished_seq_ids=kept)


def _step_name(job: StepJob) -> str:
    return f"step {job.plan.step_id} (micro-batch {job.plan.micro_batch})"
