"""Judging checked steps apart from the users' steps.

A checked step's result goes to the engine as soon as it arrives, the tokens of its checked
sequences marked held (molink.pipeline.spot_holds): the other sequences of the step go on.
``PendingChecks`` gathers the primary's result and each check route's, in any order; once
all are in, ``SpotJudge`` (one thread) compares them:

* hidden states: the node after the checked hop received the primary's output and each
  check's (molink.pipeline.witness); it is asked for the last row of each checked
  sequence of each of them, compared within the dtypes' tolerance. A perturbation that
  changes no token is caught here. When the checked hop is the route's last, there is no
  next node and its answer is the sampled tokens themselves;
* sampled tokens: exactly where sampling is deterministic, logprobs within the tolerance.

Each pair of answers gives one verdict (molink.security.bans.Verdicts); a ban it proves is
applied afterwards (``on_verdict``: the head evicts the node and replays its sequences on
other routes), and only then are the step's held tokens let go (``on_judged``): a
convicted primary's are dropped, so no token of a checked step reaches a user before its
verdict. Unchecked steps' tokens are not vetted: checks bound how long a liar lasts there.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import grpc
import torch

from molink.errors import ProtocolError
from molink.pipeline.mirroring import is_shadow, original_id, shadow_id, unshadow
from molink.pipeline.spot_holds import HeldTokens
from molink.placement.route import RouteHop
from molink.security.peer_text import peer_text
from molink.security.spot_check import Answer, SpotChecker, Tolerance
from molink.step import StepResult
from molink.transport.channel import NodeClient, describe_rpc_error
from molink.transport.codec import decode_tensor
from molink.transport.config import TransportConfig
from molink.transport.generated import molink_pb2 as pb

logger = logging.getLogger(__name__)

_MAX_PENDING = 10_000
_MAX_QUEUED = 1_000  # steps waiting to be judged; beyond that new ones are skipped
# Clients (gRPC channels) to the nodes asked what a step carried: nodes come and go at new
# addresses, and any member can join under fresh ids and ports; the least recently asked
# is closed first beyond this many.
MAX_WITNESS_CLIENTS = 64


@dataclass
class CheckedStep:
    """One step of checked sequences and what is known to judge it."""

    step_id: int
    micro_batch: int
    primary_node: str
    check_nodes: dict[int, str]  # group -> the node its check route swapped in
    deterministic: frozenset[int]
    seq_ids: tuple[int, ...]  # the checked sequences this step computes (primary ids)
    witness: RouteHop | None  # the node after the checked hop; None: it is the last
    hidden_size: int
    tolerance: Tolerance
    results: dict[int, StepResult] = field(default_factory=dict)  # -1: the primary's


class PendingChecks:
    """Gathers a checked step's results; hands every primary result on at once, its
    checked sequences' tokens held (``holds``) until the step is judged."""

    def __init__(self, on_complete: Callable[[CheckedStep], bool], holds: HeldTokens) -> None:
        self._on_complete = on_complete  # False: it will not be judged
        self._holds = holds
        self._lock = threading.Lock()
        self._pending: dict[tuple[int, int], CheckedStep] = {}

    def expect(self, step: CheckedStep) -> None:
        with self._lock:
            while len(self._pending) >= _MAX_PENDING:  # steps whose re-run was lost
                lost = self._pending.pop(next(iter(self._pending)))
                self._holds.unchecked((lost.step_id, lost.micro_batch), "its re-run was lost")
            self._pending[(step.step_id, step.micro_batch)] = step

    def arrive(self, result: StepResult) -> list[StepResult]:
        """Takes any result the head receives; returns what to hand on now: a primary
        result at once (its checked sequences' tokens marked held), nothing for a check
        route's."""
        group = -1
        if is_shadow(result.step_id):
            group = original_id(result.step_id)[1]
            result = unshadow(result)
        key = (result.step_id, result.micro_batch)
        done = None
        held: tuple[int, ...] = ()
        with self._lock:
            step = self._pending.get(key)
            if step is not None:
                step.results[group] = result
                if group < 0 and result.error is None:
                    checked = set(step.seq_ids)
                    held = tuple(
                        t.seq_id for t in result.sampled if t.seq_id in checked and not t.error
                    )
                    self._holds.hold(key, held, step.primary_node)  # before it can be judged
                if len(step.results) == len(step.check_nodes) + 1:
                    done = self._pending.pop(key)
        if done is not None:
            failed = next((r.error for r in done.results.values() if r.error), None)
            if failed is not None:  # a failed step proves nothing about anyone's honesty
                self._holds.unchecked(key, f"a run of it failed: {failed}")
            elif not self._on_complete(done):
                self._holds.unchecked(key, "judging falls behind")
        if group >= 0:
            return []
        return [replace(result, held_seq_ids=held)] if held else [result]

    def drop_node(self, node_id: str) -> list[tuple[int, int]]:
        """``node_id`` left: the re-runs it was part of will not come; returns the steps
        dropped."""
        with self._lock:
            dropped = [
                key
                for key, step in self._pending.items()
                if node_id in step.check_nodes.values() or node_id == step.primary_node
            ]
            for key in dropped:
                del self._pending[key]
        return dropped


class SpotJudge:
    """One thread judging completed checked steps (see the module docstring)."""

    def __init__(
        self,
        checker: SpotChecker,
        head_id: str,
        config: TransportConfig,
        on_verdict: Callable[[], None] = lambda: None,
        on_judged: Callable[[CheckedStep], None] = lambda step: None,
    ) -> None:
        """``on_verdict`` applies the bans a step proved; ``on_judged`` follows it, even
        when judging failed."""
        self.checker = checker
        self._head_id = head_id
        self._config = config
        self._on_verdict = on_verdict
        self._on_judged = on_judged
        self._queue: queue.Queue[CheckedStep | None] = queue.Queue(maxsize=_MAX_QUEUED)
        # address -> client, least recently used first (used on the judging thread only)
        self._clients: OrderedDict[str, NodeClient] = OrderedDict()
        self._lock = threading.Lock()
        self._hidden = {"compared": 0, "unavailable": 0}  # steps, by whether rows were had
        self._thread = threading.Thread(target=self._run, name="spot-judge", daemon=True)
        self._thread.start()

    def submit(self, step: CheckedStep) -> bool:
        """Queue ``step`` for judging; False when judging falls behind (it is skipped)."""
        try:
            self._queue.put_nowait(step)
        except queue.Full:
            logger.warning("spot checks: judging falls behind; step %d skipped", step.step_id)
            return False
        return True

    def close(self) -> None:
        try:
            self._queue.put(None, timeout=1.0)
        except queue.Full:
            pass
        self._thread.join(timeout=5.0)
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    def _run(self) -> None:
        while (step := self._queue.get()) is not None:
            try:
                self.judge(step)
                self._on_verdict()
            except Exception:  # never let one step end the judging
                logger.exception("spot checks: judging step %d failed", step.step_id)
            finally:
                self._on_judged(step)

    def judge(self, step: CheckedStep) -> None:
        """Compare every pair of the step's answers (primary first)."""
        hidden = self._witnessed(step)
        if step.witness is not None and step.seq_ids:
            with self._lock:
                self._hidden["compared" if len(hidden) > 1 else "unavailable"] += 1
        primary = step.results[-1]
        groups = sorted(step.check_nodes)
        mirrored = {s.seq_id for g in groups for s in step.results[g].sampled}
        mine = replace(primary, sampled=tuple(s for s in primary.sampled if s.seq_id in mirrored))
        answers = [Answer(step.primary_node, mine, hidden.get(-1))]
        answers += [Answer(step.check_nodes[g], step.results[g], hidden.get(g)) for g in groups]
        for i, first in enumerate(answers):
            for second in answers[i + 1 :]:
                self.checker.judge_answers(first, second, step.deterministic, step.tolerance)

    def metric_lines(self) -> list[str]:
        with self._lock:
            counts = dict(self._hidden)
        lines = [
            "# HELP molink_spot_check_hidden_total Checked steps whose hidden states the next "
            "node told (compared), or could not (unavailable: only tokens were compared).",
            "# TYPE molink_spot_check_hidden_total counter",
        ]
        lines += [f'molink_spot_check_hidden_total{{outcome="{k}"}} {v}' for k, v in counts.items()]
        return lines

    def _witnessed(self, step: CheckedStep) -> dict[int, torch.Tensor]:
        """The checked sequences' rows each answer sent the next node (-1: the primary's),
        as that node tells; empty when there is no next node or it cannot tell."""
        if step.witness is None or not step.seq_ids:
            return {}
        groups = [-1, *sorted(step.check_nodes)]
        request = pb.WitnessRequest(head_id=self._head_id)
        for group in groups:
            ids = step.seq_ids if group < 0 else [shadow_id(s, group) for s in step.seq_ids]
            step_id = step.step_id if group < 0 else shadow_id(step.step_id, group)
            request.queries.add(step_id=step_id, micro_batch=step.micro_batch, seq_ids=ids)
        try:
            response = self._client(step.witness.address, step.witness.node_id).witness(request)
        except grpc.RpcError as exc:
            logger.info(
                "spot checks: node %s cannot tell what step %d carried: %s",
                step.witness.node_id,
                step.step_id,
                describe_rpc_error(exc),
            )
            return {}
        rows: dict[int, torch.Tensor] = {}
        for group, answer in zip(groups, response.answers, strict=False):
            if answer.missing:
                logger.info("spot checks: %s", peer_text(answer.missing))
                continue
            try:
                rows[group] = decode_tensor(
                    answer.rows,
                    (len(step.seq_ids), step.hidden_size),
                    self._config.max_message_bytes,
                    what=f"rows node {step.witness.node_id} received",
                )
            except ProtocolError as exc:
                logger.warning("spot checks: %s", exc)
        return rows

    def _client(self, address: str, node_id: str) -> NodeClient:
        """In a swarm the node at ``address`` must prove to be ``node_id``."""
        client = self._clients.get(address)
        if client is not None and client.expected_node_id not in (None, node_id):
            client.close()
            client = None
        if client is None:
            client = self._clients[address] = NodeClient(address, self._config, node_id)
        self._clients.move_to_end(address)
        while len(self._clients) > MAX_WITNESS_CLIENTS:
            self._clients.popitem(last=False)[1].close()
        return client
