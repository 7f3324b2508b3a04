"""Time limits, automatic retries and CUDA out-of-memory requeues (app/limits.py), on a real
daemon with fake GPUs, a private tmux server (or the direct runner) and real processes."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from app import control, limits
from app.cli import main
from app.headers import parse_duration, parse_header
from app.models import JobState, RequirementError
from app.proctree import read_proc
from app.schema import MIGRATIONS
from app.settings import SettingsError
from app.settings_sources import from_sources
from app.store import Store
from tests.helpers import wait_until
from tests.workspace import Workspace, job_status, make_workspace, serving

#: A job whose process tree outlives a plain SIGTERM of its top: a background child, and with
#: `--stubborn` both ignore SIGTERM (so only the SIGKILL after the grace period stops them).
TREE_SCRIPT = """\
import os, signal, subprocess, sys, time
stubborn = "--stubborn" in sys.argv
if stubborn:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
code = "import signal, time\\n"
if stubborn:
    code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
child = subprocess.Popen([sys.executable, "-c", code + "time.sleep(60)"])
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(60)
"""

#: A job that dies of CUDA out-of-memory as PyTorch reports it; one line per run in `marks`.
OOM_SCRIPT = """\
import sys
with open(sys.argv[1], "a") as f:
    f.write("run\\n")
print("Traceback (most recent call last):")
print("torch.cuda.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB", flush=True)
sys.exit(1)
"""


def _ticks_until(ws: Workspace, job_id: int, state: JobState, timeout: float = 15.0) -> None:
    def reached() -> bool:
        ws.tick()
        return ws.job(job_id).status == state

    wait_until(reached, timeout=timeout, interval=0.05)


def _gone(pid: int) -> bool:
    info = read_proc(pid)
    return info is None or info.state in ("Z", "X")


def _tree_job(ws: Workspace, name: str, args: str) -> tuple[str, Path]:
    script = ws.root / "tree.py"
    script.write_text(TREE_SCRIPT)
    pids = ws.root / f"{name}.pids"
    return f"0,{script},,{pids} {args},", pids


def _pids(path: Path) -> list[int]:
    wait_until(path.exists, timeout=10)
    return [int(p) for p in path.read_text().split()]


def test_time_limit_kills_the_tree_frees_the_gpu_and_is_not_retried(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    line, pid_file = _tree_job(ws, "a", "--gpusched-time-limit 1 --gpusched-retries 2")
    ws.append(line, ws.job_line("--sleep 0"))
    ws.tick()
    assert ws.job(1).status == JobState.RUNNING and ws.job(2).status == JobState.PENDING
    parent, child = _pids(pid_file)
    _ticks_until(ws, 1, JobState.KILLED)
    job = ws.job(1)
    assert job.reason == "time limit 1s exceeded"
    assert job.ended_at is not None and job.started_at is not None
    assert 1.0 <= job.ended_at - job.started_at < 5.0
    assert ws.store.history(1)[-1][1:] == ("killed", "killed (time limit 1s exceeded)")
    # The GPU was freed in the same pass: the next job starts without waiting for the kill.
    assert ws.job(2).status in (JobState.RUNNING, JobState.COMPLETED)
    wait_until(lambda: _gone(parent) and _gone(child), timeout=10)
    _ticks_until(ws, 2, JobState.COMPLETED)
    for _ in range(5):  # killed by its time limit: never retried, whatever --retries says
        ws.tick()
    assert ws.job(1).status == JobState.KILLED and ws.job(1).retries_done == 0
    ws.daemon.limits.close()


def test_time_limit_sigkills_a_tree_that_ignores_sigterm_direct_runner(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = make_workspace(
        tmp_path, tmux_socket, gpus=1, runner="direct", time_limit=1.0, kill_grace=0.5
    )
    line, pid_file = _tree_job(ws, "s", "--stubborn")
    ws.append(line, ws.job_line("--sleep 60 --gpusched-time-limit 1h --llm half"))
    try:
        ws.tick()
        pids = _pids(pid_file)
        _ticks_until(ws, 1, JobState.KILLED)
        assert ws.job(1).reason == "time limit 1s exceeded"  # the `time_limit` setting
        wait_until(lambda: all(_gone(pid) for pid in pids), timeout=10)
        ws.tick()
        # Its own limit (1h) wins over the setting's: still running.
        assert ws.job(2).status == JobState.RUNNING
    finally:
        ws.daemon.limits.close()
        ws.daemon.runner.close()  # type: ignore[attr-defined]


def test_failed_job_retried_with_backoff_then_stays_failed(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1, retry_wait=10.0)
    marks = tmp_path / "marks.txt"
    ws.append(ws.job_line(f"--exit 3 --mark {marks} --name r --gpusched-retries 2"))
    ws.tick()
    waits = []
    for retry in (1, 2):
        _ticks_until(ws, 1, JobState.PENDING)
        job = ws.job(1)
        assert job.retries_done == retry and job.exit_code is None and job.gpus == ()
        assert job.reason.startswith(f"retry {retry}/2 after exit 3, not before ")
        at, state, detail = ws.store.history(1)[-1]
        assert state == "pending" and detail.startswith(f"exit 3; retry {retry}/2")
        assert job.next_attempt_at is not None
        waits.append(job.next_attempt_at - at)
        ws.tick(job.next_attempt_at - 1.0)  # backing off: not launched yet
        assert ws.job(1).status == JobState.PENDING
        ws.tick(job.next_attempt_at + 0.01)
        assert ws.job(1).status == JobState.RUNNING
    assert waits == [pytest.approx(10.0), pytest.approx(20.0)]  # doubling
    _ticks_until(ws, 1, JobState.FAILED)
    job = ws.job(1)
    assert job.id == 1 and len(ws.store.jobs()) == 1  # the same job, never a duplicate
    assert job.exit_code == 3 and job.reason == "gave up after 3 runs (2 retries)"
    assert marks.read_text().splitlines() == ["r", "r", "r"]
    retries = [d for _, s, d in ws.store.history(1) if s == "pending" and "retry" in d]
    assert len(retries) == 2


def test_real_loop_keeps_limits_and_backoffs_with_a_long_poll_interval(
    tmp_path: Path, tmux_socket: str
) -> None:
    """`run()` sleeps until the next time limit or back-off ends, not a whole 30 s pass."""
    ws = make_workspace(tmp_path, tmux_socket, gpus=2, tick_interval=30.0, retry_wait=0.3)
    marks = tmp_path / "marks.txt"
    ws.append(
        ws.job_line("--sleep 60 --gpusched-time-limit 1"),
        ws.job_line(f"--exit 1 --mark {marks} --name x --gpusched-retries 1"),
    )
    with serving(ws) as store:
        wait_until(lambda: job_status(store, 1) == JobState.KILLED, timeout=8)
        wait_until(lambda: job_status(store, 2) == JobState.FAILED, timeout=8)
    assert marks.read_text().splitlines() == ["x", "x"]


def test_user_kill_is_never_retried(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1, retry_wait=0.1)
    ws.append(ws.job_line("--sleep 30 --gpusched-retries 3"))
    ws.tick()
    wait_until(lambda: ws.job(1).launched)
    control.kill_job(ws.store, ws.paths, 1)
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:
        ws.tick()
        time.sleep(0.05)
    job = ws.job(1)
    assert job.status == JobState.KILLED and job.retries_done == 0 and job.reason == ""


def test_cuda_oom_requeued_once_with_more_memory(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=2)
    script, marks = tmp_path / "oom.py", tmp_path / "oom.marks"
    script.write_text(OOM_SCRIPT)
    ws.append(f"0,{script},,{marks} --llm half --gpusched-vram 8,")
    ws.tick()
    assert ws.job(1).vram_mb == 8192
    _ticks_until(ws, 1, JobState.FAILED)  # requeued (and placed again at once), then failed
    states = [(state, detail) for _, state, detail in ws.store.history(1)][1:]
    assert [state for state, _ in states] == ["running", "pending", "running", "failed"]
    assert states[1][1] == "exit 1; requeued after CUDA out of memory (vram 8 GB -> 12 GB)"
    job = ws.job(1)
    assert job.oom_vram_mb == 12288 and job.vram_mb == 12288  # placed with the bigger one
    assert job.exit_code == 1 and job.reason == "CUDA out of memory again with 12 GB reserved"
    assert marks.read_text().splitlines() == ["run", "run"]


def test_cuda_oom_without_declared_memory_asks_for_more_of_the_gpu(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)  # 80 GB GPUs
    script, marks = tmp_path / "oom.py", tmp_path / "oom.marks"
    script.write_text(OOM_SCRIPT)
    ws.append(f"0,{script},,{marks} --llm half,", f"0,{script},,{marks} --llm one,")
    ws.tick()
    _ticks_until(ws, 1, JobState.FAILED)
    _ticks_until(ws, 2, JobState.FAILED)
    requeued = [d for job_id in (1, 2) for _, _, d in ws.store.history(job_id) if "vram" in d]
    # Half a GPU was 40 GB: it asks for 60; a whole GPU cannot grow past the GPU's 80 GB.
    assert requeued == [
        "exit 1; requeued after CUDA out of memory (vram 40 GB -> 60 GB)",
        "exit 1; requeued after CUDA out of memory (vram 80 GB -> 80 GB)",
    ]
    assert ws.job(1).vram_mb == 61440 and ws.job(2).vram_mb == 81920


def test_bad_directives_are_line_errors(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    ws.append(
        ws.job_line("--gpusched-time-limit 2x"),
        ws.job_line("--gpusched-time-limit=0"),
        ws.job_line("--gpusched-retries -1"),
        ws.job_line("--a --gpusched-time-limit"),
        ws.job_line("--gpusched-time-limit 1h30m --gpusched-retries 2 --sleep 0"),
    )
    ws.tick()
    assert [str(e) for e in ws.store.line_errors()] == [
        "jobs.txt:1: arguments: --gpusched-time-limit: '2x' is not a duration "
        "(use e.g. 90, 90s, 30m, 2h or 1h30m)",
        "jobs.txt:2: arguments: --gpusched-time-limit must be more than 0 seconds, not 0",
        "jobs.txt:3: arguments: --gpusched-retries must be a whole number of retries from 0 "
        "to 1000, not '-1'",
        "jobs.txt:4: arguments: --gpusched-time-limit needs a value",
    ]
    job = ws.job(1)  # the good line, its directives read and kept off the command line
    assert ws.daemon.limits.time_limit(job) == 5400 and ws.daemon.limits.retries(job) == 2
    assert "--gpusched" not in (job.command or "")


def test_durations_headers_and_settings() -> None:
    cases = {"90": 90, "90s": 90, "30m": 1800, "2h": 7200, "1h30m": 5400, "1.5h": 5400}
    assert {text: parse_duration(text) for text in cases} == cases
    for bad in ("", "2x", "1h30", "-5", "h"):
        with pytest.raises(RequirementError):
            parse_duration(bad)
    header = parse_header('# {"requirements": {"time_limit": "2h", "retries": 1}}')
    assert header is not None and (header.time_limit_s, header.retries) == (7200, 1)
    with pytest.raises(RequirementError, match="'retries' must be a whole number"):
        parse_header('# {"requirements": {"retries": 1.5}}')
    settings = from_sources({"GPUSCHED_TIME_LIMIT": "1h30m", "GPUSCHED_RETRIES": "2"}, {})
    assert (settings.time_limit, settings.retries, settings.retry_wait) == (5400, 2, 30)
    with pytest.raises(SettingsError, match="expected a duration"):
        from_sources({}, {"time_limit": "soon"})
    assert limits.retry_wait(30, 1) == 30 and limits.retry_wait(30, 3) == 120
    assert limits.retry_wait(30, 50) == limits.RETRY_WAIT_CAP_S


def test_add_writes_the_directives(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    script, jobs = tmp_path / "train.py", tmp_path / "jobs.txt"
    script.write_text("")
    argv = ["add", str(script), "--args", "--lr 3", "--output-file", str(jobs)]
    assert main([*argv, "--time-limit", "2h", "--retries", "3"]) == 0
    directives = "--gpusched-time-limit 2h --gpusched-retries 3"
    assert jobs.read_text() == f"0,{script},,--lr 3 {directives},\n"
    assert main([*argv, "--time-limit", "2 hours"]) == 1
    assert main([*argv, "--retries", "many"]) == 1
    err = capsys.readouterr().err
    assert "--time-limit: '2 hours' is not a duration" in err
    assert "--retries must be a whole number" in err
    assert len(jobs.read_text().splitlines()) == 1


def test_database_from_before_run_limits_migrates(tmp_path: Path) -> None:
    path = tmp_path / "gpusched.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE migrations (name TEXT PRIMARY KEY, at REAL)")
    for name, migrate in MIGRATIONS:
        if name in ("001_initial", "002_job_revisions", "003_inputs"):
            migrate(db)
            db.execute("INSERT INTO migrations VALUES (?, 0)", (name,))
    db.execute(
        "INSERT INTO jobs (key, status, priority, seq, script, conda_env, args, submitted_at,"
        " queued_at) VALUES ('k', 'failed', 0, 1, '/x.py', '', '', 0, 0)"
    )
    db.close()
    store = Store(path)
    try:
        job = store.job(1)
        assert job is not None and job.retries_done == 0 and job.oom_vram_mb is None
        assert store.retry(1, 1.0) and store.job(1).status == JobState.PENDING  # type: ignore[union-attr]
    finally:
        store.close()


# A job that saves a checkpoint when told to stop: SIGTERM, a second of work, then a marker.
CHECKPOINT_SCRIPT = """\
import signal, sys, time
def save(signum, frame):
    time.sleep(1.0)
    open(sys.argv[1], "w").write("saved")
    sys.exit(0)
signal.signal(signal.SIGTERM, save)
open(sys.argv[1] + ".started", "w").close()
time.sleep(120)
"""


@pytest.mark.parametrize(("grace", "saved"), [(30.0, True), (0.0, False)])
def test_kill_gives_the_job_the_schedulers_kill_grace(
    tmp_path: Path, tmux_socket: str, grace: float, saved: bool
) -> None:
    # `gpusched kill` runs in another process: it takes the grace the scheduler recorded.
    ws = make_workspace(tmp_path, tmux_socket, gpus=1, kill_grace=grace)
    script = ws.root / "checkpoint.py"
    script.write_text(CHECKPOINT_SCRIPT)
    marker = ws.root / "checkpoint"
    with serving(ws) as store:
        wait_until(lambda: store.meta("kill_grace") == repr(grace))
        ws.append(f"0,{script},,{marker},")
        wait_until(Path(f"{marker}.started").exists, timeout=20)
        control.kill_job(store, ws.paths, 1)
        assert job_status(store, 1) == JobState.KILLED
    assert marker.exists() is saved  # a grace of 0 is SIGKILL at once: no time to save
