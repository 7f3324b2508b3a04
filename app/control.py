"""Actions shared by the CLI and the dashboard. All of them go through the state database,
so they work whether the scheduler runs in this process, in another one, or not at all; a
running scheduler is woken through the `wakeup` file and acts within a second.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from pathlib import Path

from app.headers import read_header
from app.models import Job, JobState
from app.paths import FILE_MODE, StatePaths, private_dir, private_file, tighten
from app.runners import Runner, TmuxRunner
from app.runners.direct import DirectRunner, kill_orphan, stdout_echo, tail_argv
from app.runners.screen import ScreenRunner
from app.settings import Settings, check_field
from app.store import Store


class ActionError(Exception):
    """An action that cannot be done; the message says why and what to do."""


class AlreadyRunningError(ActionError):
    pass


def runner_id_for(socket_name: str | None) -> str:
    return f"tmux:{socket_name or ''}"


def runner_for(runner_id: str) -> Runner:
    """The runner a job was started by, from the id stored with it (`tmux:SOCKET`,
    `screen:SCREENDIR`, `direct:PID`). A direct runner seen from another process knows no
    sessions: its jobs are reached by pid (`kill_job`) and log (`attach_argv`)."""
    kind, _, arg = runner_id.partition(":")
    if kind == "tmux":
        if arg and check_field("tmux_socket", arg):  # never a path: `-L ../elsewhere`
            raise ActionError(f"runner {runner_id!r}: bad tmux socket name")
        return TmuxRunner(arg or None)
    if kind == "screen":
        return ScreenRunner(arg or None)
    if kind == "direct":
        return DirectRunner(echo=None)
    raise ActionError(f"unknown runner {runner_id!r}")


def make_runner(settings: Settings, echo: bool = True) -> tuple[Runner, str]:
    """The scheduler's runner for `--runner` and the id stored with each job it starts."""
    if settings.runner == "screen":
        screendir = os.environ.get("SCREENDIR") or None  # private sockets, e.g. in tests
        return ScreenRunner(screendir), f"screen:{screendir or ''}"
    if settings.runner == "direct":
        runner = DirectRunner(stdout_echo if echo else None, grace_s=settings.kill_grace)
        return runner, f"direct:{os.getpid()}"
    return TmuxRunner(settings.tmux_socket), runner_id_for(settings.tmux_socket)


def attach_argv(job: Job) -> list[str]:
    """The command that shows a running job: attach to its session, or follow its log."""
    runner_id = job.runner or runner_id_for(None)
    if runner_id.startswith("direct:"):
        return tail_argv(Path(job.log_path or "/dev/null"))
    return runner_for(runner_id).attach_argv(job.session or "")


#: How long SchedulerLock.acquire retries a busy lock before refusing.
LOCK_GRACE_S = 0.5


class SchedulerLock:
    """One scheduler per state directory: an flock held for the scheduler's whole life."""

    def __init__(self, paths: StatePaths) -> None:
        self.path = paths.lock
        self._fd: int | None = None

    def acquire(self) -> None:
        private_dir(self.path.parent, existing_too=False)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        tighten(self.path)
        deadline = time.monotonic() + LOCK_GRACE_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # A scheduler holds the lock for its whole life; scheduler_pid() (status, the
                # dashboard's poll) holds it shared for an instant. Refuse only a lock that
                # stays busy.
                if time.monotonic() < deadline:
                    time.sleep(0.01)
                    continue
                os.close(fd)
                pid = read_pid(self.path)
                raise AlreadyRunningError(
                    f"another gpusched scheduler (pid {pid or 'unknown'}) is already running on "
                    f"state directory {self.path.parent}; stop it first or use another --state-dir"
                ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip() or "0") or None
    except (OSError, ValueError):
        return None


def scheduler_pid(paths: StatePaths) -> int | None:
    """The pid of the scheduler running on this state directory, or None."""
    try:
        fd = os.open(paths.lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_pid(paths.lock) or -1
    finally:
        os.close(fd)
    return None


def wake_scheduler(paths: StatePaths) -> None:
    private_dir(paths.root, existing_too=False)
    private_file(paths.wakeup)
    paths.wakeup.write_text(f"{time.time()}\n")


def known_gpus(store: Store) -> list[int] | None:
    """The GPU ids the scheduler manages (physical ids: `--gpu-ids 2,3` gives [2, 3])."""
    raw = store.meta("gpus")
    return [int(g.get("index", i)) for i, g in enumerate(json.loads(raw))] if raw else None


def set_paused(store: Store, paths: StatePaths, gpu: int, paused: bool) -> str:
    known = known_gpus(store)
    if gpu < 0 or (known is not None and gpu not in known):
        names = ", ".join(map(str, known)) if known else ""
        where = f"the scheduler manages GPU {names}" if known else "no GPUs known yet"
        raise ActionError(f"GPU {gpu} is not one of the scheduler's GPUs ({where})")
    changed = store.set_paused(gpu, paused)
    wake_scheduler(paths)
    verb = "paused" if paused else "resumed"
    return f"GPU {gpu} {verb}" if changed else f"GPU {gpu} was already {verb}"


def get_job(store: Store, job_id: int) -> Job:
    job = store.job(job_id)
    if job is None:
        raise ActionError(f"no job {job_id}")
    return job


def kill_grace(store: Store) -> float:
    """The `kill_grace` of the scheduler that last ran on this state (the default before)."""
    try:
        grace = float(store.meta("kill_grace") or "")  # none recorded: "" is not a number
    except ValueError:
        return Settings.kill_grace
    return grace if check_field("kill_grace", grace) is None else Settings.kill_grace


def kill_job(store: Store, paths: StatePaths, job_id: int) -> str:
    """Pending: removed from the queue. Running: its whole process tree is killed."""
    job = get_job(store, job_id)
    now = time.time()
    if job.status not in (JobState.PENDING, JobState.RUNNING):
        raise ActionError(f"job {job_id} already ended ({job.status})")
    detail = "killed by the user" if job.status == JobState.RUNNING else "removed from the queue"
    # The end is recorded before the session is killed, so the scheduler never takes the
    # dying session for a crash; the conditional transition loses cleanly to a job that
    # ended on its own meanwhile.
    if not store.transition(
        job_id, JobState.KILLED, when=[job.status], now=now, detail=detail, ended_at=now, reason=""
    ):
        raise ActionError(f"job {job_id} already ended ({get_job(store, job_id).status})")
    grace = kill_grace(store)
    if job.status == JobState.RUNNING and (job.runner or "").startswith("direct:"):
        if job.pid:  # a child of the scheduler process: reached by its pid
            kill_orphan(job.pid, paths.run_spec(job_id), grace_s=grace)
        paths.exit_file(job_id).unlink(missing_ok=True)
    elif job.status == JobState.RUNNING and job.session:
        runner_for(job.runner or runner_id_for(None)).kill(job.session, grace_s=grace)
        paths.exit_file(job_id).unlink(missing_ok=True)
    wake_scheduler(paths)
    return (
        f"job {job_id} killed (session {job.session})" if job.session else f"job {job_id} {detail}"
    )


def retry_job(store: Store, paths: StatePaths, job_id: int) -> str:
    job = get_job(store, job_id)
    if job.kind == "script":  # the user may have fixed the script's header meanwhile
        store.set_fields(job_id, declared=read_header(Path(job.script)))
    if not store.retry(job_id, time.time()):
        raise ActionError(
            f"job {job_id} is {job.status}; only failed, killed, lost or unschedulable jobs "
            "can be retried"
        )
    wake_scheduler(paths)
    return f"job {job_id} queued again"


def change_priority(store: Store, paths: StatePaths, job_id: int, delta: int) -> str:
    """Move a pending job up (delta < 0: lower number, runs sooner) or down the queue."""
    job = get_job(store, job_id)
    if job.status != JobState.PENDING or not store.set_priority(job_id, job.priority + delta):
        raise ActionError(f"job {job_id} is {job.status}; only a pending job's priority can change")
    wake_scheduler(paths)
    return f"job {job_id} priority {job.priority} → {job.priority + delta}"


def remove_pending(store: Store, paths: StatePaths, job_id: int) -> str:
    """Take a job off the queue (it becomes `killed`; `retry` queues it again)."""
    job = get_job(store, job_id)
    if job.status != JobState.PENDING:
        raise ActionError(f"job {job_id} is {job.status}; only a pending job can be removed")
    return kill_job(store, paths, job_id)
