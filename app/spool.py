"""The spool folder (the Workload Daemon's): scripts dropped in `1.to_run/` become jobs.

    DIR/1.to_run/    drop a script here
    DIR/2.queued/    queued (pending)
    DIR/3.running/   running
    DIR/4.executed/  ended with exit 0
    DIR/4.failed/    failed, killed, lost or unschedulable

The database decides where a script belongs: after every change of a spool job (by the
scheduler, the CLI or the dashboard) `sync` moves its script to the folder of its state and
records the new path, so `retry` of a failed script moves it back to `2.queued/`. A script is
moved to `2.queued/` before its job is recorded; a crash in between leaves it there without a
job, and `recover` queues such files on the next start.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from app.headers import read_header
from app.models import Job, JobSpec, JobState
from app.store import Store

log = logging.getLogger("gpusched")

SOURCE_PREFIX = "spool:"
TO_RUN, QUEUED, RUNNING, EXECUTED, FAILED = (
    "1.to_run", "2.queued", "3.running", "4.executed", "4.failed"
)  # fmt: skip
FOLDER_OF = {
    JobState.PENDING: QUEUED,
    JobState.RUNNING: RUNNING,
    JobState.COMPLETED: EXECUTED,
    JobState.FAILED: FAILED,
    JobState.KILLED: FAILED,
    JobState.LOST: FAILED,
    JobState.UNSCHEDULABLE: FAILED,
}


def _skipped(name: str) -> bool:
    """Hidden files and editors' temporaries are not jobs (yet): they get renamed when done."""
    return name.startswith(".") or name.endswith(("~", ".swp", ".tmp", ".part"))


class Spool:
    def __init__(self, root: Path, store: Store) -> None:
        self.root = root.resolve()
        self.store = store
        self._rev = 0
        for name in (TO_RUN, QUEUED, RUNNING, EXECUTED, FAILED):
            (self.root / name).mkdir(parents=True, exist_ok=True)

    @property
    def inbox(self) -> Path:
        return self.root / TO_RUN

    def intake(self, now: float) -> list[int]:
        """Queue every script in `1.to_run/`, oldest first; returns the new jobs' ids."""
        found = []
        for entry in os.scandir(self.inbox):
            if entry.is_file(follow_symlinks=False) and not _skipped(entry.name):
                found.append((entry.stat().st_mtime_ns, entry.name))
        queued = []
        for _, name in sorted(found):
            target = _free_name(self.root / QUEUED, name)
            try:
                (self.inbox / name).rename(target)
            except OSError as exc:
                log.error("spool: cannot move %s to %s: %s", name, QUEUED, exc)  # noqa: TRY400
                continue
            queued += self._queue(target, now)
        return queued

    def recover(self, now: float) -> list[int]:
        """Queue scripts left in `2.queued/` by a crash between the move and the record."""
        known = {job.script for job in self.store.jobs_changed_since(0, SOURCE_PREFIX)}
        queued = []
        for path in sorted((self.root / QUEUED).iterdir()):
            # Names skipped as in 1.to_run: e.g. an editor's swap file next to a queued script.
            script = path.is_file() and not path.is_symlink() and not _skipped(path.name)
            if script and str(path) not in known:
                queued += self._queue(path, now)
        return queued

    def _queue(self, script: Path, now: float) -> list[int]:
        # Every drop is a new job: a script moved back by hand (`mv 4.failed/x.sh 1.to_run/`)
        # keeps its inode and mtime, and must not be taken for the job it already was.
        spec = JobSpec(
            0, str(script), "", "", None, f"{SOURCE_PREFIX}{script.name}",
            declared=read_header(script), nonce=uuid.uuid4().hex,
        )  # fmt: skip
        report = self.store.ingest(f"{SOURCE_PREFIX}{self.root}", "{}", None, [], [spec], [], now)
        for job_id in report.queued:
            log.info("job %d queued from the spool folder: %s", job_id, script.name)
        return report.queued

    def sync(self) -> None:
        """Move the scripts of spool jobs that changed to the folder of their state."""
        for job in self.store.jobs_changed_since(self._rev, SOURCE_PREFIX):
            self._rev = max(self._rev, job.rev)
            self.place(job)

    def place(self, job: Job, state: JobState | None = None) -> Path:
        """Move `job`'s script to the folder of its state (or of `state`: the launch moves it
        to `3.running/` before it starts); returns where it is now."""
        current = Path(job.script)
        folder = self.root / FOLDER_OF.get(state or job.status, QUEUED)
        if current.parent == folder or not current.exists():
            return current
        target = _free_name(folder, current.name)
        try:
            current.rename(target)
        except OSError as exc:
            log.error("spool: cannot move %s to %s: %s", current, folder.name, exc)  # noqa: TRY400
            return current
        self.store.set_fields(job.id, script=str(target))
        log.info("spool: job %d's %s moved to %s", job.id, current.name, folder.name)
        return target


def _free_name(folder: Path, name: str) -> Path:
    """`folder/name`, else `folder/stem.1.sh`, `.2`... (the same script dropped twice): the
    suffix stays last, since it decides how the script runs."""
    target = folder / name
    path = Path(name)
    n = 0
    while target.exists():
        n += 1
        target = folder / f"{path.stem}.{n}{path.suffix}"
    return target
