"""Faults against the real loop: tmux server killed, GPUs vanishing or hanging, the jobs file
turned into something else, many writers at once. Each runs `serve` with a real tmux server."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import control
from app.gpus.fake import write_fake_gpus
from app.jobsfile import parse_line
from app.models import JobSpec, JobState
from app.store import Store
from tests.helpers import wait_until
from tests.workspace import Workspace, job_status, make_workspace, serving

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def ws(tmp_path: Path, tmux_socket: str) -> Workspace:
    # Sessions are checked every second (default 20 s): a vanished tmux server is noticed soon.
    return make_workspace(tmp_path, tmux_socket, gpus=2, probe_timeout=1.0, state_interval=1.0)


def shares(store: Store) -> dict[int, float]:
    """GPU -> the share our running jobs hold on it."""
    held: dict[int, float] = {}
    for job in store.jobs([JobState.RUNNING]):
        for gpu in job.gpus:
            held[gpu] = held.get(gpu, 0.0) + (job.share or 0.0)
    return held


def test_tmux_server_killed_under_running_jobs(ws: Workspace) -> None:
    """The jobs become lost (their GPUs freed) and the loop goes on starting new jobs."""
    with serving(ws) as store:
        ws.append(ws.job_line("--sleep 60 --name a"), ws.job_line("--sleep 60 --name b"))
        wait_until(lambda: all(getattr(store.job(i), "launched", False) for i in (1, 2)))
        subprocess.run(["tmux", "-L", ws.settings.tmux_socket, "kill-server"], check=True)
        ended = {JobState.LOST, JobState.FAILED}
        wait_until(lambda: {job_status(store, i) for i in (1, 2)} <= ended)
        assert shares(store) == {}
        ws.append(ws.job_line(f"--mark {ws.root / 'ran'} --name c"))
        wait_until(lambda: job_status(store, 3) == JobState.COMPLETED, timeout=20)
        assert (ws.root / "ran").read_text() == "c\n"


def test_fewer_gpus_than_before(ws: Workspace) -> None:
    """A GPU disappearing under a running job: that job keeps its record, new jobs go only to
    the GPUs that are left, and the vanished GPU's job still ends normally."""
    gpus = ws.root / "gpus.json"
    with serving(ws) as store:
        ws.append(ws.job_line("--sleep 1.5 --name a", allowed="1"))
        wait_until(lambda: job_status(store, 1) == JobState.RUNNING)
        write_fake_gpus(gpus, 1)  # GPU 1 is gone
        ws.append(ws.job_line("--llm one --sleep 0 --name b"), ws.job_line("--name c", allowed="1"))
        wait_until(lambda: job_status(store, 2) == JobState.COMPLETED, timeout=20)
        assert store.job(2).gpus == (0,)  # type: ignore[union-attr]
        wait_until(lambda: job_status(store, 1) == JobState.COMPLETED, timeout=20)
        # A new line that may only use the vanished GPU is refused, with its file:line.
        (error,) = store.line_errors()
        assert (error.file, error.line) == ("jobs.txt", 3) and "1" in error.reason, error
        assert len(store.jobs()) == 2


@pytest.mark.timeout(60)
def test_gpu_probe_that_hangs(ws: Workspace) -> None:
    """The fake GPU file replaced by a FIFO nobody writes: each snapshot blocks for good. The
    probe timeout bounds it: nothing is placed, the reason says why, the loop keeps going,
    and jobs start once the file is back."""
    gpus = ws.root / "gpus.json"
    good = gpus.read_text()
    gpus.unlink()
    os.mkfifo(gpus)
    fifo = ws.root / "fifo"
    os.link(gpus, fifo)  # a second name, to release the hung read at the end
    try:
        with serving(ws) as store:
            ws.append(ws.job_line("--name a"))
            wait_until(lambda: "hung" in getattr(store.job(1), "reason", ""), timeout=20)
            job = store.job(1)
            assert job is not None and job.status == JobState.PENDING, job
            assert job.reason.startswith("GPUs unknown: GPU probe 'fake'"), job.reason
            # The "driver" recovers: the file is back, and the hung read gets its answer.
            (ws.root / "good.json").write_text(good)
            (ws.root / "good.json").replace(gpus)
            with fifo.open("w") as f:
                f.write(good)
            wait_until(lambda: job_status(store, 1) == JobState.COMPLETED, timeout=30)
    finally:  # a read still hung (the test failed early): release its thread
        with contextlib.suppress(OSError):  # ENXIO: no reader waiting
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))


def test_jobs_file_replaced_by_a_directory_then_restored(ws: Workspace) -> None:
    with serving(ws) as store:
        ws.append(ws.job_line("--name a"))
        wait_until(lambda: job_status(store, 1) == JobState.COMPLETED)
        ws.jobs_file.unlink()
        ws.jobs_file.mkdir()
        control.wake_scheduler(ws.paths)
        wait_until(lambda: any("directory" in m for _, _, m in store.events(50)), timeout=10)
        ws.jobs_file.rmdir()
        # Restored the way an editor would: the old line and one new.
        ws.jobs_file.write_text(ws.job_line("--name a") + "\n" + ws.job_line("--name b") + "\n")
        control.wake_scheduler(ws.paths)
        wait_until(lambda: job_status(store, 2) == JobState.COMPLETED, timeout=20)
        assert len(store.jobs()) == 2  # the old line did not run again


@pytest.mark.timeout(60)
def test_jobs_file_replaced_by_a_named_pipe(ws: Workspace) -> None:
    """A FIFO would block the read for good: it is reported and not opened, and the loop
    goes on (a job already queued still starts)."""
    ws.store.set_paused(0, True)
    ws.store.set_paused(1, True)
    with serving(ws) as store:
        ws.append(ws.job_line("--name a"))
        wait_until(lambda: job_status(store, 1) == JobState.PENDING)
        ws.jobs_file.unlink()
        os.mkfifo(ws.jobs_file)
        control.wake_scheduler(ws.paths)
        wait_until(lambda: any("named pipe" in e.reason for e in store.line_errors()))
        control.set_paused(store, ws.paths, 0, False)
        wait_until(lambda: job_status(store, 1) == JobState.COMPLETED, timeout=20)


def test_jobs_file_with_binary_content(ws: Workspace) -> None:
    """NUL bytes, invalid UTF-8, a line of 1 MB: errors with file:line, no crash, the good
    lines around them run."""
    with serving(ws) as store:
        with ws.jobs_file.open("ab") as f:
            f.write(b"\x00\x01\x02\xff\xfe garbage\n")
            f.write(b"x" * 1_000_000 + b"\n")
            f.write(ws.job_line("--name good").encode() + b"\n")
            f.write(bytes(range(256)) + b"\n")
        control.wake_scheduler(ws.paths)
        wait_until(lambda: job_status(store, 1) == JobState.COMPLETED, timeout=20)
        errors = store.line_errors()
        assert {e.line for e in errors} >= {1, 2}, errors
        assert all(e.file.endswith("jobs.txt") and e.reason for e in errors)
        assert len(store.jobs()) == 1


def test_jobs_file_deleted_then_recreated_with_new_lines(ws: Workspace) -> None:
    with serving(ws) as store:
        ws.append(ws.job_line("--name a"))
        wait_until(lambda: job_status(store, 1) == JobState.COMPLETED)
        ws.jobs_file.unlink()
        control.wake_scheduler(ws.paths)
        time.sleep(0.5)
        ws.jobs_file.write_text(ws.job_line("--name b") + "\n")
        wait_until(lambda: job_status(store, 2) == JobState.COMPLETED, timeout=20)
        assert [j.args for j in store.jobs()] == ["--name a", "--name b"]


def _big_jobs_file(path: Path, size: int, good: str) -> int:
    """Append `size` bytes of comment lines plus one job line; returns the job line's number."""
    block = ("# " + "x" * 1021 + "\n").encode()  # 1 KiB per line
    lines = 0
    with path.open("ab") as f:
        chunk = block * 1024
        for _ in range(size // len(chunk)):
            f.write(chunk)
            lines += 1024
        f.write(good.encode() + b"\n")
    return lines + 1


@pytest.mark.timeout(120)
def test_jobs_file_grows_by_64_mb(ws: Workspace) -> None:
    """A runaway writer: 64 MB of lines at once (1 GB in `pytest -m soak`). The loop reads it in
    bounded steps and runs the one job line at its end."""
    _grow_and_check(ws, 64 << 20)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_jobs_file_grows_by_1_gb(ws: Workspace) -> None:
    _grow_and_check(ws, 1 << 30)


def _grow_and_check(ws: Workspace, size: int) -> None:
    with serving(ws) as store:
        number = _big_jobs_file(ws.jobs_file, size, ws.job_line("--name after"))
        control.wake_scheduler(ws.paths)
        wait_until(lambda: job_status(store, 1) == JobState.COMPLETED, timeout=size / 2e6 + 30)
        job = store.job(1)
        assert job is not None and job.source.endswith(f"jobs.txt:{number}")


def _adders(ws: Workspace, procs: int, each: int) -> None:
    """`procs` processes, each running `gpusched add` `each` times as fast as it can."""
    script = (
        "import subprocess, sys\n"
        "for i in range(int(sys.argv[2])):\n"
        "    subprocess.run([sys.executable, '-m', 'app', 'add', '--state-dir', sys.argv[3],\n"
        "                    sys.argv[4], f'--args=--name p{sys.argv[1]}-{i}'], check=True,\n"
        "                   stdout=subprocess.DEVNULL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(p), str(each), str(ws.paths.root), str(ws.script)],
            env=env,
            cwd=ws.root,
        )
        for p in range(procs)
    ]
    for child in children:
        assert child.wait(timeout=900) == 0


def _concurrent_adds(ws: Workspace, procs: int, each: int) -> None:
    for gpu in (0, 1):  # nothing runs: the test is about the queue
        ws.store.set_paused(gpu, True)
    with serving(ws) as store:
        _adders(ws, procs, each)
        total = procs * each
        wait_until(lambda: len(store.jobs()) == total, timeout=60)
        names = sorted(j.args for j in store.jobs())
    assert names == sorted(f"--name p{p}-{i}" for p in range(procs) for i in range(each))
    lines = [line for line in ws.jobs_file.read_text().splitlines() if line.strip()]
    assert len(lines) == total
    for number, line in enumerate(lines, start=1):  # no torn or interleaved line
        spec = parse_line(line, file="jobs.txt", line=number, base_dir=ws.root, gpu_count=2)
        assert isinstance(spec, JobSpec), (number, line, spec)


@pytest.mark.timeout(300)
def test_concurrent_adds_while_the_daemon_runs(ws: Workspace) -> None:
    """20 processes add jobs at once (5 each here, 50 each in `pytest -m soak`): every job
    arrives exactly once and every line of the jobs file is whole."""
    _concurrent_adds(ws, 20, 5)


@pytest.mark.soak
@pytest.mark.timeout(1800)
def test_concurrent_adds_1000(ws: Workspace) -> None:
    _concurrent_adds(ws, 20, 50)
