"""What the dashboard shows, read from the state database (no Textual here).

`DashboardReader.poll()` runs in a worker thread. It reads only what changed since the last
poll: jobs by their revision stamp, GPUs from the snapshot the scheduler stores in `meta`,
paused GPUs, counts and jobs-file errors, so a poll costs the same with 100 or 10,000 jobs.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from app.control import runner_for, runner_id_for, scheduler_pid
from app.models import Job, JobState, LineError
from app.paths import StatePaths
from app.store import Store

#: Utilisation samples kept per GPU for the sparkline (at most one per second).
HISTORY = 60
#: How much of a log file the detail pane reads from its end.
LOG_TAIL_BYTES = 16384


@dataclass(frozen=True)
class GpuView:
    index: int
    name: str
    memory_used_mb: int
    memory_total_mb: int
    utilization: float
    history: tuple[float, ...]
    allocated: float
    paused: bool
    jobs: tuple[int, ...]


@dataclass(frozen=True)
class Header:
    scheduler_pid: int | None
    started_at: float | None
    state_dir: str
    jobs_file: str
    backend: str
    probe_error: str
    gpus_at: float | None
    counts: dict[str, int]


@dataclass(frozen=True)
class Snapshot:
    header: Header
    gpus: tuple[GpuView, ...]
    changed: tuple[Job, ...]
    """Jobs inserted or updated since the previous poll (all of them on the first)."""
    errors: tuple[LineError, ...]
    now: float


@dataclass(frozen=True)
class Detail:
    job: Job
    history: tuple[tuple[float, str, str], ...]
    tail: tuple[str, ...]
    tail_source: str
    """Where `tail` came from: "pane", "log" or "" (nothing to show)."""


@dataclass
class DashboardReader:
    """The dashboard's own connection to the state database; thread-safe (one lock)."""

    paths: StatePaths
    clock: Callable[[], float] = time.time
    _store: Store | None = None
    _rev: int = 0
    _history: dict[int, deque[float]] = field(default_factory=dict)
    _sampled_at: float = 0.0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = Store(self.paths.ensure().db)
        return self._store

    def close(self) -> None:
        with self._lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def poll(self) -> Snapshot:
        with self._lock:
            store = self.store
            changed = store.jobs_changed_since(self._rev)
            if changed:
                self._rev = max(self._rev, changed[-1].rev)  # in revision order
            running = store.jobs([JobState.RUNNING])
            meta = store.metas("started_at", "jobs_file", "backend", "probe_error", "gpus_at",
                               "gpus")  # fmt: skip
            gpus = self._gpus(store, running, meta.get("gpus"))
            header = Header(
                scheduler_pid=scheduler_pid(self.paths),
                started_at=_float(meta.get("started_at")),
                state_dir=str(self.paths.root),
                jobs_file=meta.get("jobs_file", ""),
                backend=meta.get("backend", ""),
                probe_error=meta.get("probe_error", ""),
                gpus_at=_float(meta.get("gpus_at")),
                counts=store.counts(),
            )
            errors = tuple(store.line_errors())
        return Snapshot(header, gpus, tuple(changed), errors, self.clock())

    def _gpus(self, store: Store, running: list[Job], raw: str | None) -> tuple[GpuView, ...]:
        paused = store.paused()
        now = self.clock()
        sample = now - self._sampled_at >= 1.0
        if sample:
            self._sampled_at = now
        views = []
        for index, gpu in enumerate(json.loads(raw or "[]")):
            history = self._history.setdefault(index, deque(maxlen=HISTORY))
            if sample or not history:
                history.append(float(gpu["utilization"]))
            on_gpu = [j for j in running if index in j.gpus]
            views.append(
                GpuView(
                    index=index,
                    name=str(gpu["name"]),
                    memory_used_mb=int(gpu["memory_used_mb"]),
                    memory_total_mb=int(gpu["memory_total_mb"]),
                    utilization=float(gpu["utilization"]),
                    history=tuple(history),
                    allocated=round(sum(j.share or 0.0 for j in on_gpu), 6),
                    paused=index in paused,
                    jobs=tuple(j.id for j in on_gpu),
                )
            )
        return tuple(views)

    def detail(self, job_id: int, lines: int = 40) -> Detail | None:
        with self._lock:
            job = self.store.job(job_id)
            if job is None:
                return None
            history = tuple(self.store.history(job_id))
        tail, source = _tail(job, lines)
        return Detail(job, history, tail, source)


def _tail(job: Job, lines: int) -> tuple[tuple[str, ...], str]:
    """A running job's pane (so a progress bar shows as drawn), else its log's last lines."""
    if job.status == JobState.RUNNING and job.session:
        try:
            pane = runner_for(job.runner or runner_id_for(None)).pane_tail(job.session, lines)
        except Exception:  # the pane is a nicety; the log below is the record
            pane = []
        if pane:
            return tuple(pane[-lines:]), "pane"
    if job.log_path:
        text = read_tail(Path(job.log_path), LOG_TAIL_BYTES)
        if text is not None:
            # A progress bar redraws with \r: show each line as it was last drawn.
            shown = [line.rsplit("\r", 1)[-1] for line in text.splitlines()]
            return tuple(shown[-lines:]), "log"
    return (), ""


def read_tail(path: Path, size: int) -> str | None:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            end = f.tell()
            f.seek(max(0, end - size))
            data = f.read()
    except OSError:
        return None
    if len(data) == size and b"\n" in data:  # drop the partial first line
        data = data.split(b"\n", 1)[1]
    return data.decode("utf-8", errors="replace")


def _float(text: str | None) -> float | None:
    try:
        return float(text) if text else None
    except ValueError:
        return None
