"""The pending jobs as the allocator's queue, kept up to date incrementally.

Every scheduler pass hands the allocator the whole queue. Reading all pending rows and
rebuilding every `QueuedJob` each pass cost O(queue) per pass (tens of ms with 10,000 jobs,
and a pass per job end); instead the rows that changed since the last pass are read by their
revision stamp (schema `002_job_revisions`, the same feed the dashboard reads), and a job's
`QueuedJob` is rebuilt only when its row or the model config changed. When nothing changed,
the previous queue is reused as it is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from app import jobsfile
from app.allocator_queue import PreparedQueue
from app.models import Job, JobState, QueuedJob, Requirement, RequirementError
from app.requirements import LlmConfig
from app.store import Store


@dataclass
class Queue:
    """One pass's view of the pending jobs."""

    queue: list[QueuedJob] = field(default_factory=list)  # placeable now (no back-off)
    jobs_by_id: dict[int, Job] = field(default_factory=dict)
    requirement_of: dict[int, Requirement] = field(default_factory=dict)
    #: stored requirement / vram that no longer match the config (for display and the ledger)
    changes: dict[int, dict[str, object]] = field(default_factory=dict)
    #: jobs whose requirement cannot be met by any configuration of GPUs, with the reason
    invalid: list[tuple[Job, str]] = field(default_factory=list)
    #: `queue` sorted and grouped for the allocator, once per change (app/allocator_queue.py)
    prepared: PreparedQueue = field(default_factory=lambda: PreparedQueue(()))


@dataclass
class _Entry:
    job: Job
    requirement: Requirement | RequirementError
    queued: QueuedJob | None


class PendingQueue:
    """The pending jobs and their `QueuedJob`s, refreshed from the rows changed since."""

    def __init__(self, store: Store, requirement: Callable[[LlmConfig, Job], Requirement]) -> None:
        self._store = store
        self._requirement = requirement
        self._rev = store.max_rev()  # first: a row written meanwhile is read again, harmlessly
        self._jobs: dict[int, Job] = {job.id: job for job in store.jobs([JobState.PENDING])}
        self._entries: dict[int, _Entry] = {}
        self._config: LlmConfig | None = None
        self._last: Queue | None = None
        self._expires = float("inf")  # the earliest launch back-off that ends

    def jobs(self) -> list[Job]:
        self._refresh()
        return list(self._jobs.values())

    def _refresh(self) -> bool:
        """Apply the rows written since the last look; True when a pending job changed."""
        changed = unordered = False
        for job in self._store.jobs_changed_since(self._rev):
            self._rev = max(self._rev, job.rev)
            if job.status == JobState.PENDING:
                if job.id not in self._jobs and self._jobs and job.id < next(reversed(self._jobs)):
                    unordered = True  # a retried job comes back with its old id
                self._jobs[job.id] = job
                changed = True
            elif self._jobs.pop(job.id, None) is not None:
                changed = True
        if unordered:  # by id, as the store lists them
            self._jobs = dict(sorted(self._jobs.items()))
        return changed

    def build(self, config: LlmConfig, now: float) -> Queue:
        changed = self._refresh()
        last = self._last
        if last is not None and not changed and config is self._config and now < self._expires:
            # already applied: no changes, no invalid jobs
            return Queue(last.queue, last.jobs_by_id, last.requirement_of, prepared=last.prepared)
        if config is not self._config:
            self._config = config
            self._entries.clear()
        built = Queue()
        self._expires = float("inf")
        entries: dict[int, _Entry] = {}
        for job in self._jobs.values():
            entry = self._entries.get(job.id)
            if entry is None or entry.job is not job:
                entry = self._entry(config, job)
            entries[job.id] = entry
            requirement = entry.requirement
            if isinstance(requirement, RequirementError):
                built.invalid.append((job, str(requirement)))
                continue
            if job.requirement != requirement.amount or job.vram_mb != requirement.vram_mb:
                built.changes[job.id] = {
                    "requirement": requirement.amount,
                    "vram_mb": requirement.vram_mb,
                }
            if job.next_attempt_at is not None and job.next_attempt_at > now:
                self._expires = min(self._expires, job.next_attempt_at)
                continue  # waiting out a launch back-off; its reason says so
            assert entry.queued is not None
            built.queue.append(entry.queued)
            built.jobs_by_id[job.id] = job
            built.requirement_of[job.id] = requirement
        built.prepared = PreparedQueue(built.queue)  # here, once per change, not every pass
        built.queue = built.prepared.jobs
        self._entries = entries
        self._last = built
        return built

    def _entry(self, config: LlmConfig, job: Job) -> _Entry:
        try:
            requirement = self._requirement(config, job)
        except RequirementError as exc:
            return _Entry(job, exc, None)
        queued = QueuedJob(
            id=job.id,
            priority=job.priority,
            seq=job.seq,
            requirement=requirement,
            allowed_gpus=jobsfile.parse_gpu_list(job.allowed_gpus or ""),
            waiting_since=job.queued_at,
        )
        return _Entry(job, requirement, queued)
