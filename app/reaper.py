"""Decides what each job the store calls `running` really is now.

Sources, most trusted first: the exit record the in-pane wrapper wrote (atomically, even while
the scheduler was down); the runner's view of the session (alive, dead with tmux's
`pane_dead_status`, or gone). On start this is the restore step after a crash:
- session alive                    -> re-adopted;
- exit record present              -> completed / failed with the recorded code;
- session gone, launch not confirmed -> back to pending (it never ran: the crash hit mid-launch);
- session gone, no record          -> lost, its GPUs freed.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.models import Job, JobState
from app.paths import StatePaths
from app.runners import Runner, RunnerError, SessionState
from app.runners.direct import kill_orphan
from app.store import Store

log = logging.getLogger("gpusched")

#: A job's session name (app/launch.py `session_name`): `gpujob_<id>_<gpus>_<script>`.
_JOB_SESSION = re.compile(r"gpujob_(\d+)_")
_NOT_ENDED = (JobState.PENDING, JobState.RUNNING)


@dataclass(frozen=True)
class ExitRecord:
    exit_code: int
    ended_at: float | None


def read_exit_record(path: Path) -> ExitRecord | None:
    try:
        data = json.loads(path.read_text())
        return ExitRecord(int(data["exit_code"]), data.get("ended_at"))
    except (OSError, ValueError, KeyError, TypeError):
        return None


class Reaper:
    def __init__(
        self,
        store: Store,
        paths: StatePaths,
        runner: Runner,
        runner_for: Callable[[str], Runner] | None = None,
        runner_id: str = "",
        kill_grace: float = 5.0,
    ) -> None:
        self.store = store
        self.kill_grace = kill_grace  # SIGTERM -> SIGKILL, for a killed job's leftover session
        self.paths = paths
        self.runner = runner
        self.runner_id = runner_id
        self.runner_for = runner_for
        #: decides what a non-zero exit becomes (app/limits.py: retried, requeued or failed)
        #: and records it; None: it recorded nothing (the job ended otherwise meanwhile)
        self.on_failure: Callable[[Job, int, float, str], JobState | None] | None = None

    def reconcile(self, now: float) -> list[tuple[int, JobState]]:
        """The restore step on start: every running job is checked against its session."""
        ended = self.reap(now, check_sessions=True)
        self._sweep_ended_sessions()
        for job in self.store.jobs([JobState.RUNNING]):
            log.info("job %d re-adopted (session %s)", job.id, job.session)
        return ended

    def reap(self, now: float, *, check_sessions: bool) -> list[tuple[int, JobState]]:
        running = self.store.jobs([JobState.RUNNING])
        if not running:
            return []
        ended: list[tuple[int, JobState]] = []
        sessions: dict[str, dict[str, SessionState]] = {}
        for job in running:
            outcome = self._record_exit(job, now)
            if outcome is None and check_sessions:
                state = self._session_state(job, sessions)
                outcome = self._judge(job, state, now)
            if outcome is not None:
                ended.append((job.id, outcome))
        return ended

    def _sweep_ended_sessions(self) -> None:
        """Sessions left behind by a scheduler killed (SIGKILL) after recording a job's end but
        before removing its session (removals wait for the end of a pass), or after `kill` was
        recorded during the job's launch but before that launch could stop the new session."""
        try:
            sessions = self.runner.sessions()
        except RunnerError as exc:
            log.warning("cannot list sessions to clean up: %s", exc)
            return
        for name, state in sessions.items():
            match = _JOB_SESSION.match(name)
            job = self.store.job(int(match.group(1))) if match else None
            if job is None or job.session != name or job.status in _NOT_ENDED:
                continue  # not ours, or an earlier run's of a job queued again
            if (job.runner or self.runner_id) != self.runner_id:
                continue  # started by another runner (a restart with other settings)
            if not state.alive:
                log.info("job %d (%s): removing its leftover session %s", job.id, job.status, name)
                self.runner.remove(name)
            elif job.status == JobState.KILLED:
                log.info("job %d was killed: stopping its leftover session %s", job.id, name)
                self.runner.kill(name, grace_s=self.kill_grace)

    def _session_state(
        self, job: Job, cache: dict[str, dict[str, SessionState]]
    ) -> SessionState | None:
        runner_id = job.runner or self.runner_id
        if runner_id not in cache:
            cache[runner_id] = self._runner(runner_id).sessions()
        return cache[runner_id].get(job.session or "")

    def _runner(self, runner_id: str) -> Runner:
        if runner_id == self.runner_id or self.runner_for is None:
            return self.runner
        return self.runner_for(runner_id)

    def _record_exit(self, job: Job, now: float) -> JobState | None:
        record = read_exit_record(self.paths.exit_file(job.id))
        if record is None:
            return None
        return self._finish(job, record.exit_code, record.ended_at or now, "")

    def _finish(self, job: Job, code: int, ended_at: float, note: str) -> JobState | None:
        state = JobState.COMPLETED if code == 0 else JobState.FAILED
        detail = f"exit {code}{note}"
        if code != 0 and self.on_failure is not None:
            found = self.on_failure(job, code, ended_at, detail)
            if found is None:
                return None
            state = found
        elif not self.store.transition(
            job.id,
            state,
            when=[JobState.RUNNING],
            detail=detail,
            now=ended_at,
            exit_code=code,
            ended_at=ended_at,
            launched=1,
        ):
            return None
        log.info("job %d %s (%s)", job.id, state, detail)
        if job.session:
            self._runner(job.runner or self.runner_id).remove(job.session)
        self._forget_files(job.id)
        return state

    def _forget_files(self, job_id: int) -> None:
        # The launch spec holds the job's whole environment: keep it no longer than needed.
        self.paths.exit_file(job_id).unlink(missing_ok=True)
        self.paths.run_spec(job_id).unlink(missing_ok=True)

    def _judge(self, job: Job, state: SessionState | None, now: float) -> JobState | None:
        # Read the record again: the wrapper may have written it after our first look.
        record = read_exit_record(self.paths.exit_file(job.id))
        if record is not None:
            return self._finish(job, record.exit_code, record.ended_at or now, "")
        if state is not None and state.alive:
            if not job.launched:
                self.store.set_fields(job.id, launched=1, pid=state.pid)
            return None
        if state is not None and state.dead_status is not None:
            return self._finish(
                job, state.dead_status, now, " (from tmux: the wrapper left no exit record)"
            )
        if not job.launched:
            # The scheduler stopped between marking the job running and creating its session:
            # it never ran, so it goes back to the queue instead of being lost.
            self.store.unplace(
                job.id, "launch interrupted by a scheduler restart; queued again", now
            )
            return JobState.PENDING
        detail = f"session {job.session} vanished with no exit record"
        if self.store.transition(
            job.id,
            JobState.LOST,
            when=[JobState.RUNNING],
            detail=detail,
            now=now,
            ended_at=now,
            reason=detail,
        ):
            log.error("job %d lost: %s", job.id, detail)
            # A direct job's child of an earlier scheduler may live on, orphaned, on GPUs that
            # are now free again: stop it (only if that pid is still this job's wrapper).
            direct = (job.runner or "").startswith("direct:")
            if direct and job.pid and kill_orphan(job.pid, self.paths.run_spec(job.id)):
                log.info("job %d: stopped the orphaned process %d", job.id, job.pid)
            self._forget_files(job.id)
            return JobState.LOST
        return None
