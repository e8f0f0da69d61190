"""A node's queue of jobs, shared fairly between the heads that send them.

Each head has its own first-in-first-out queue (its steps and releases keep their order,
which its sequences' KV depends on); the compute thread serves the heads in turn, one pass
per head per round, so a head with a long backlog delays another head's step by at most
one pass of its own, however many steps it has queued. Jobs of different heads touch
disjoint sequences, so the order between heads changes no result.

Each head may queue at most ``max_per_head`` jobs: one head's backlog cannot fill the room
that another head's steps need. All heads together may queue at most ``max_total``: any
swarm member can make itself fresh head ids, each with its own allowance.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, Protocol, TypeVar


class HeadJob(Protocol):
    @property
    def head_id(self) -> str: ...


J = TypeVar("J", bound=HeadJob)


class QueueFullError(Exception):
    """A head's queue, or the whole queue, stayed full for the whole timeout; the message
    says which."""


class HeadFairQueue(Generic[J]):
    def __init__(self, max_per_head: int, max_total: int | None = None) -> None:
        self.max_per_head = max_per_head
        self.max_total = max_total
        self._queues: dict[str, deque[J]] = {}
        self._turns: deque[str] = deque()  # heads with queued jobs, next to be served first
        self._size = 0
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def put(self, job: J, timeout: float) -> None:
        """Queue ``job`` behind its head's others; QueueFullError after ``timeout`` seconds
        while that head already has ``max_per_head`` queued, or all heads ``max_total``."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while (full := self._full(job.head_id)) is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise QueueFullError(full)
                self._changed.wait(left)
            queue = self._queues.setdefault(job.head_id, deque())
            if not queue:
                self._turns.append(job.head_id)
            queue.append(job)
            self._size += 1
            self._changed.notify_all()

    def _full(self, head_id: str) -> str | None:
        """Why a job of ``head_id`` cannot be queued now (None: it can)."""
        if len(self._queues.get(head_id, ())) >= self.max_per_head:
            return f"{self.max_per_head} steps of head {head_id} are queued"
        if self.max_total is not None and self._size >= self.max_total:
            return f"{self.max_total} steps of all heads are queued (max_queued_steps_per_node)"
        return None

    def get(self, timeout: float) -> J | None:
        """The first job of the head whose turn it is (None after ``timeout`` idle); that
        head then goes to the back of the round."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not self._turns:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)
            head_id = self._turns.popleft()
            job = self._pop(head_id)
            if self._queues.get(head_id):
                self._turns.append(head_id)
            return job

    def take_next_if(self, head_id: str, accept: Callable[[J], bool]) -> J | None:
        """The next job of ``head_id`` if ``accept`` takes it (to join the same pass);
        otherwise None, and the job stays first in its head's queue."""
        with self._changed:
            queue = self._queues.get(head_id)
            if not queue or not accept(queue[0]):
                return None
            job = self._pop(head_id)
            if not self._queues.get(head_id) and head_id in self._turns:
                self._turns.remove(head_id)
            return job

    def qsize(self) -> int:
        return self._size

    def queued_by_head(self) -> dict[str, int]:
        with self._lock:
            return {head: len(queue) for head, queue in self._queues.items() if queue}

    def _pop(self, head_id: str) -> J:
        queue = self._queues[head_id]
        job = queue.popleft()
        if not queue:
            del self._queues[head_id]
        self._size -= 1
        self._changed.notify_all()
        return job
