"""Per-job time limits, automatic retries of failed runs, and CUDA out-of-memory requeues.

* **Time limits** (`--gpusched-time-limit 2h`, a header's `time_limit`, else the `time_limit`
  setting): `RunLimits.enforce`, called once per scheduler pass, records a running job past
  `started_at + limit` as `killed` (reason `time limit 2h exceeded`) *before* stopping it, as
  `gpusched kill` does, so its GPUs are free for the same pass; its whole process tree is then
  stopped (SIGTERM, SIGKILL after `kill_grace` seconds) in a background thread, so the scheduler
  never waits for the grace period.
* **Retries** (`--gpusched-retries N`, a header's `retries`, else the `retries` setting): the
  reaper hands every non-zero exit to `RunLimits.after_failure`, which puts the job back in
  the queue (same id, same place) with `next_attempt_at` = now + `retry_wait` × 2^(n-1)
  (capped at RETRY_WAIT_CAP_S) while retries are left, else records it failed. Killed (by the
  user or a time limit) and lost jobs are never retried.
* **CUDA out of memory**: a failed job whose log ends with a CUDA out-of-memory error is
  queued again once, whatever its retries, asking for 1.5× the GPU memory it was expected to
  use (its declared `vram`, else its share of the GPU), at most the largest allowed GPU's.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shlex
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from app import headers, jobsfile
from app.headers import Declared, format_duration
from app.models import Job, JobState, Requirement, RequirementError
from app.paths import StatePaths
from app.requirements import LlmConfig
from app.runners import Runner
from app.runners.direct import kill_orphan
from app.settings import Settings
from app.store import Store

log = logging.getLogger("gpusched")

#: The longest wait before an automatic retry, however many retries came before.
RETRY_WAIT_CAP_S = 3600.0
#: How much of the end of a job's log is searched for a CUDA out-of-memory error.
OOM_TAIL_BYTES = 64 * 1024
#: GPU memory asked for after an out-of-memory death, relative to what the run had.
OOM_FACTOR = 1.5
OOM_PATTERN = re.compile(
    rb"CUDA out of memory|(?:torch|cuda)\.OutOfMemoryError|CUBLAS_STATUS_ALLOC_FAILED"
    rb"|CUDA error: out of memory|CUDA_ERROR_OUT_OF_MEMORY"
)

RequirementOf = Callable[[LlmConfig, Job], Requirement]


def retry_wait(base: float, retry: int) -> float:
    """The wait before automatic retry number `retry` (1, 2, ...): base, 2×base, 4×base, ..."""
    return min(base * 2.0 ** min(retry - 1, 60), max(base, RETRY_WAIT_CAP_S))


def log_says_oom(path: Path) -> bool:
    """Whether the last OOM_TAIL_BYTES of a job's log hold a CUDA out-of-memory error."""
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(f.tell() - OOM_TAIL_BYTES, 0))
            return OOM_PATTERN.search(f.read()) is not None
    except OSError:
        return False


def with_oom_vram(requirement: RequirementOf) -> RequirementOf:
    """`requirement`, with the GPU memory an out-of-memory requeue asked for where there is."""

    def get(config: LlmConfig, job: Job) -> Requirement:
        found = requirement(config, job)
        return found if job.oom_vram_mb is None else replace(found, vram_mb=job.oom_vram_mb)

    return get


def _gb(mb: int) -> str:
    return f"{round(mb / 1024, 1):g} GB"


class RunLimits:
    def __init__(
        self,
        settings: Settings,
        store: Store,
        paths: StatePaths,
        runner: Runner,
        runner_id: str,
        runner_for: Callable[[str], Runner] | None = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.paths = paths
        self.runner = runner
        self.runner_id = runner_id
        self.runner_for = runner_for
        self._declared: dict[tuple[str, str, str], Declared] = {}
        self._threads: list[threading.Thread] = []
        self._limit_due = math.inf  # when the first running job's time limit runs out
        self._retry_due: list[float] = []  # when retries' back-offs end

    # ---- what a job declared -----------------------------------------------------------------

    def declared(self, job: Job) -> Declared:
        """The job's own time limit and retries: its line's directives over its header."""
        key = (job.kind, job.args, job.declared)
        found = self._declared.get(key)
        if found is None:
            try:
                words = shlex.split(job.args) if job.kind == "script" else []
                line, _ = headers.split_directives(words)
                found = line.over(headers.decode(job.declared))
            except (ValueError, RequirementError):  # such a job is unschedulable: never runs
                found = Declared()
            if len(self._declared) > 10_000:
                self._declared.clear()
            self._declared[key] = found
        return found

    def time_limit(self, job: Job) -> float | None:
        own = self.declared(job).time_limit_s
        return own if own is not None else self.settings.time_limit

    def retries(self, job: Job) -> int:
        own = self.declared(job).retries
        return own if own is not None else self.settings.retries

    # ---- time limits ---------------------------------------------------------------------------

    def enforce(self, now: float) -> list[tuple[int, JobState]]:
        """Record every running job past its time limit as killed and stop it (in the
        background); returns those jobs."""
        killed: list[tuple[int, JobState]] = []
        self._limit_due = math.inf
        self._retry_due = [due for due in self._retry_due if due > now]
        for job in self.store.jobs([JobState.RUNNING]):
            limit = self.time_limit(job)
            if limit is None or not job.launched or job.started_at is None:
                continue
            if now - job.started_at < limit:
                self._limit_due = min(self._limit_due, job.started_at + limit)
                continue
            reason = f"time limit {format_duration(limit)} exceeded"
            if not self.store.transition(
                job.id,
                JobState.KILLED,
                when=[JobState.RUNNING],
                now=now,
                detail=f"killed ({reason})",
                reason=reason,
                ended_at=now,
            ):
                continue  # it ended on its own, or was killed, meanwhile
            log.warning("job %d killed: %s", job.id, reason)
            thread = threading.Thread(
                target=self._stop, args=(job,), name=f"gpusched-limit-{job.id}", daemon=True
            )
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
            thread.start()
            killed.append((job.id, JobState.KILLED))
        return killed

    def _stop(self, job: Job) -> None:
        """Kill the job's whole process tree (blocks up to about the `kill_grace` setting)."""
        runner_id = job.runner or self.runner_id
        grace = self.settings.kill_grace
        try:
            if runner_id == self.runner_id and job.session:
                self.runner.kill(job.session, grace_s=grace)
            elif runner_id.startswith("direct:"):  # a child of an earlier scheduler
                if job.pid:
                    kill_orphan(job.pid, self.paths.run_spec(job.id), grace_s=grace)
            elif self.runner_for is not None and job.session:
                self.runner_for(runner_id).kill(job.session, grace_s=grace)
        except Exception:  # a thread of its own: nobody else would hear of it
            log.exception("job %d: stopping it after its time limit failed", job.id)
        self.paths.exit_file(job.id).unlink(missing_ok=True)  # its end is already recorded

    def wait_for(self, longest: float) -> float:
        """How long the scheduler may sleep: `longest`, or less when a time limit runs out or
        a retry's back-off ends sooner (a long `--poll-interval` must not delay them)."""
        due = min([self._limit_due, *self._retry_due]) - time.time()
        return min(longest, max(due + 0.01, 0.01))

    def close(self) -> None:
        """Wait for the kills in progress (the scheduler is stopping)."""
        for thread in self._threads:
            thread.join(self.settings.kill_grace + 5.0)
        self._threads = []

    # ---- failed runs -----------------------------------------------------------------------

    def after_failure(self, job: Job, code: int, ended_at: float, detail: str) -> JobState | None:
        """Record a running job's non-zero exit: queued again (CUDA out of memory, retries
        left) or failed. None when it ended otherwise meanwhile (killed): nothing recorded."""
        oom = log_says_oom(Path(job.log_path)) if job.log_path else False
        now = ended_at
        bump = self._oom_vram(job) if oom and job.oom_vram_mb is None else None
        if bump is not None:
            before, after = bump
            reason = f"requeued after CUDA out of memory (vram {_gb(before)} -> {_gb(after)})"
            return self._requeue(job, now, f"{detail}; {reason}", reason, oom_vram_mb=after)
        allowed, done = self.retries(job), job.retries_done
        if done < allowed:
            wait = retry_wait(self.settings.retry_wait, done + 1)
            until = time.strftime("%H:%M:%S", time.localtime(now + wait))
            reason = f"retry {done + 1}/{allowed} after exit {code}, not before {until}"
            self._retry_due.append(now + wait)
            return self._requeue(
                job, now, f"{detail}; {reason}", reason,
                retries_done=done + 1, next_attempt_at=now + wait,
            )  # fmt: skip
        notes = []
        if oom:
            memory = f" with {_gb(job.oom_vram_mb)} reserved" if job.oom_vram_mb else ""
            notes.append(f"CUDA out of memory{' again' if job.oom_vram_mb else ''}{memory}")
        if done:
            notes.append(f"gave up after {done + 1} runs ({done} retries)")
        reason = "; ".join(notes)
        if not self.store.transition(
            job.id, JobState.FAILED, when=[JobState.RUNNING], now=ended_at,
            detail=f"{detail}; {reason}" if reason else detail,
            exit_code=code, ended_at=ended_at, launched=1, reason=reason,
        ):  # fmt: skip
            return None
        return JobState.FAILED

    def _requeue(
        self, job: Job, now: float, detail: str, reason: str, **fields: object
    ) -> JobState | None:
        """Back to pending under the same id and place in the queue, its GPUs released."""
        if not self.store.unplace(
            job.id, detail, now, reason=reason, attempts=0, exit_code=None, ended_at=None,
            **fields,
        ):  # fmt: skip
            return None
        log.warning("job %d: %s", job.id, reason)
        return JobState.PENDING

    def _oom_vram(self, job: Job) -> tuple[int, int] | None:
        """(GPU memory the run was expected to use, what to ask for now) per GPU, in MB; None
        when the GPUs' sizes are unknown."""
        totals = self._gpu_totals()
        ran_on = [totals[g] for g in job.gpus if g in totals]
        if job.vram_mb is not None:
            before = job.vram_mb
        elif ran_on:
            before = int((job.share if job.share is not None else 1.0) * min(ran_on))
        else:
            return None
        try:
            allowed = jobsfile.parse_gpu_list(job.allowed_gpus or "")
        except ValueError:
            allowed = None
        sizes = [t for g, t in totals.items() if allowed is None or g in allowed]
        after = math.ceil(before * OOM_FACTOR)
        if sizes:
            after = max(before, min(after, max(sizes)))
        return before, after

    def _gpu_totals(self) -> dict[int, int]:
        """GPU id -> its memory (MB), from the last probe the scheduler recorded."""
        try:
            gpus = json.loads(self.store.meta("gpus") or "[]")
            return {int(g["index"]): int(g["memory_total_mb"]) for g in gpus}
        except (ValueError, KeyError, TypeError):
            return {}
