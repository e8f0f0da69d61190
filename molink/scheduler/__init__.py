"""Token catch-up scheduling: continuous batching, chunked prefill, micro-batches, preemption."""

from molink.scheduler.errors import SchedulerIntegrityError
from molink.scheduler.scheduler import Scheduler
from molink.scheduler.sequence import Sequence, SequenceStatus, SequenceUpdate, derive_seed

__all__ = [
    "Scheduler",
    "SchedulerIntegrityError",
    "Sequence",
    "SequenceStatus",
    "SequenceUpdate",
    "derive_seed",
]
