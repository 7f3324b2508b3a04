"""Storage faults against the real scheduler (`serve` in a thread or `gpusched start` as a
process), a real tmux server and real files: a corrupt database (set aside, start refused
until the user decides), a database locked by another process, a full disk and a read-only
state directory (both on a small tmpfs, which needs root: skipped otherwise). After each
fault every line of the jobs file runs exactly once."""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from app import control
from app.cli import main
from app.dbguard import (
    BUSY_TIMEOUT_ENV,
    EXIT_CORRUPT,
    EXIT_STORAGE,
    CorruptDatabaseError,
    PassFaults,
    set_aside_copies,
)
from app.models import JobState
from app.service import serve
from app.store import Store
from tests.helpers import wait_until
from tests.workspace import Workspace, job_status, make_workspace, serving

REPO = Path(__file__).resolve().parent.parent

#: Holds a write lock on the database given as argv[1] for argv[2] seconds.
HOLD_LOCK = """\
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
db.execute("COMMIT")
"""


@pytest.fixture
def ws(tmp_path: Path, tmux_socket: str) -> Workspace:
    return make_workspace(tmp_path, tmux_socket, gpus=2, state_interval=1.0)


@pytest.fixture
def tiny_ws(tmp_path: Path, tmux_socket: str) -> Iterator[Workspace]:
    """A workspace whose state directory is a 2 MiB tmpfs."""
    state = tmp_path / "state"
    state.mkdir()
    mount = ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(state)]
    res = subprocess.run(mount, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root or CAP_SYS_ADMIN): {res.stderr.strip()}")
    try:
        yield make_workspace(tmp_path, tmux_socket, gpus=2, state_interval=1.0)
    finally:
        subprocess.run(["umount", "-l", str(state)], capture_output=True, check=False)


def line(ws: Workspace, name: str, extra: str = "") -> str:
    return ws.job_line(f"--mark {ws.root / 'ran'} --name {name} {extra}".strip())


def ran(ws: Workspace) -> list[str]:
    mark = ws.root / "ran"
    return sorted(mark.read_text().split()) if mark.exists() else []


def completed(store: Store, count: int) -> bool:
    jobs = store.jobs()
    return len(jobs) == count and all(j.status == JobState.COMPLETED for j in jobs)


def start_process(ws: Workspace, *extra: str) -> subprocess.CompletedProcess[str]:
    """`gpusched start` as a process, for a start that is refused (it exits by itself)."""
    argv = [
        sys.executable, "-m", "app", "start", "--state-dir", str(ws.paths.root),
        "--jobs-file", str(ws.jobs_file), "--llm-config", str(ws.root / "llm_config.json"),
        "--gpu-backend", "fake", "--fake-gpus", str(ws.root / "gpus.json"),
        "--tmux-socket", str(ws.settings.tmux_socket), "--ramp-up", "0", *extra,
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        argv, cwd=ws.root, env=env, capture_output=True, text=True, timeout=60, check=False
    )


def cli(capsys: pytest.CaptureFixture[str], ws: Workspace, *args: str) -> tuple[int, str]:
    code = main([*args, "--state-dir", str(ws.paths.root)])
    return code, capsys.readouterr().err


@contextmanager
def serving_fresh(ws: Workspace) -> Iterator[Store]:
    """`serving`, started with --fresh-state."""
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(ws.settings, stop, False, True), daemon=True)
    thread.start()
    wait_until(lambda: ws.paths.lock.exists() and ws.paths.lock.read_text().strip())
    wait_until(lambda: ws.paths.db.exists() and ws.paths.db.stat().st_size > 0)
    store = Store(ws.paths.db)
    try:
        yield store
    finally:
        stop.set()
        control.wake_scheduler(ws.paths)
        thread.join(timeout=10)
        store.close()


def garble_page(db: Path, index: str) -> None:
    """Overwrite the header of the root page of `index` (a closed database: no WAL)."""
    with closing(sqlite3.connect(db)) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,))
    with db.open("r+b") as f:
        f.seek((root[0] - 1) * page_size)
        f.write(b"\xff" * 16)


def recover(copy: Path, db: Path) -> None:
    """What docs/reliability.md says: .recover, or .dump where this sqlite3 lacks .recover."""
    sql = ""
    for command in (".recover", ".dump"):
        argv = ["sqlite3", str(copy), command]
        res = subprocess.run(argv, capture_output=True, text=True, check=False)
        sql = res.stdout
        if res.returncode == 0 and "CREATE TABLE" in sql and "SQL logic error" not in res.stderr:
            break
    subprocess.run(["sqlite3", str(db)], input=sql, text=True, check=True)


def fill(directory: Path) -> Path:
    """Fill the file system of `directory` up to the last byte."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, b"\0" * size)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC, exc
                    break
    finally:
        os.close(fd)
    return filler


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


# ---- corrupt database ---------------------------------------------------------------------


def test_corrupt_database_is_set_aside_and_start_waits_for_a_decision(
    ws: Workspace, capsys: pytest.CaptureFixture[str]
) -> None:
    with serving(ws) as store:
        ws.append(line(ws, "a"), line(ws, "b"))
        wait_until(lambda: completed(store, 2), timeout=20)
    with ws.paths.db.open("r+b") as f:
        f.write(b"this is no SQLite header, garbage" * 4)
    garbled = ws.paths.db.read_bytes()

    # A read-only command: one line, its own exit status, and the file stays where it is.
    code, err = cli(capsys, ws, "status")
    assert code == EXIT_CORRUPT and "is corrupt (file is not a database)" in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert ws.paths.db.read_bytes() == garbled and not set_aside_copies(ws.paths.db)

    res = start_process(ws)
    assert res.returncode == EXIT_CORRUPT, res.stderr
    assert "Traceback" not in res.stderr and "--fresh-state" in res.stderr
    (copy,) = set_aside_copies(ws.paths.db)
    assert copy.read_bytes() == garbled and str(copy) in res.stderr
    assert not ws.paths.db.exists()

    # Nothing starts from an empty state by itself: not a restart, not another command.
    res = start_process(ws)
    assert res.returncode == EXIT_CORRUPT and "does not exist" in res.stderr, res.stderr
    code, err = cli(capsys, ws, "status")
    assert code == EXIT_CORRUPT and "set aside as corrupt" in err and err.count("\n") == 1
    assert not ws.paths.db.exists()

    # The user's decision: start fresh. Lines already there do not run again; new ones do.
    with serving_fresh(ws) as store:
        ws.append(line(ws, "c"))
        wait_until(lambda: completed(store, 1), timeout=20)
        assert any("fresh state: the 2 line(s)" in m for _, _, m in store.events(20))
    assert ran(ws) == ["a", "b", "c"]
    assert set_aside_copies(ws.paths.db) == [copy]  # kept until the user deletes it


@pytest.mark.skipif(shutil.which("sqlite3") is None, reason="needs the sqlite3 shell")
def test_malformed_page_found_at_start_and_recovered_with_sqlite3(ws: Workspace) -> None:
    with serving(ws) as store:
        ws.append(line(ws, "a"))
        wait_until(lambda: completed(store, 1), timeout=20)
    garble_page(ws.paths.db, "jobs_status")  # opens fine; PRAGMA quick_check finds it

    with pytest.raises(CorruptDatabaseError, match="quick_check") as caught:
        serve(ws.settings, threading.Event(), console=False)
    (copy,) = set_aside_copies(ws.paths.db)
    assert ".recover" in str(caught.value) and not ws.paths.db.exists()

    recover(copy, ws.paths.db)
    with serving(ws) as store:
        ws.append(line(ws, "b"))
        wait_until(lambda: completed(store, 2), timeout=20)
    assert ran(ws) == ["a", "b"]  # the recovered cursor: line a did not run again


# ---- locked database ------------------------------------------------------------------------


def test_database_locked_by_another_process(
    ws: Workspace,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv(BUSY_TIMEOUT_ENV, "0.3")  # instead of 30 s
    caplog.set_level(logging.INFO, logger="gpusched")
    with serving(ws) as store:
        ws.append(line(ws, "a"))
        wait_until(lambda: completed(store, 1), timeout=20)
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLD_LOCK, str(ws.paths.db), "3"],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        ws.append(line(ws, "b"), line(ws, "c"), line(ws, "d"))
        code, err = cli(capsys, ws, "pause", "0")
        assert code == EXIT_STORAGE and "locked by another process" in err, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert cli(capsys, ws, "status")[0] == 0  # readers are not blocked (WAL)
        wait_until(lambda: messages(caplog, "locked by another process"), timeout=10)
        assert len(store.jobs()) == 1  # not queued, and not marked as read either
        assert holder.wait(timeout=10) == 0
        wait_until(lambda: completed(store, 4), timeout=30)
    assert ran(ws) == ["a", "b", "c", "d"]
    assert len(messages(caplog, "locked by another process")) == 1  # logged once
    assert messages(caplog, "state storage usable again")


# ---- full disk ------------------------------------------------------------------------------


def test_disk_full_loses_no_line(tiny_ws: Workspace, caplog: pytest.LogCaptureFixture) -> None:
    ws = tiny_ws
    caplog.set_level(logging.INFO, logger="gpusched")
    key = str(ws.jobs_file.resolve())
    with serving(ws) as store:
        ws.append(line(ws, "a"))
        wait_until(lambda: completed(store, 1), timeout=20)
        cursor = store.cursor_json(key)
        filler = fill(ws.paths.root)
        # Every write appends to the WAL (checkpoints reset it only past 1000 pages): it fails.
        ws.append(*(line(ws, f"n{i}") for i in range(5)))
        wait_until(lambda: messages(caplog, "no space left"), timeout=20)
        assert len(store.jobs()) == 1 and store.cursor_json(key) == cursor
        filler.unlink()
        wait_until(lambda: completed(store, 6), timeout=30)
    assert ran(ws) == sorted(["a", *(f"n{i}" for i in range(5))])
    assert len(messages(caplog, "no space left")) == 1


def test_exit_code_kept_when_the_exit_record_cannot_be_written(tiny_ws: Workspace) -> None:
    """The wrapper cannot write its record on a full disk; it exits with the job's code,
    which tmux keeps as the dead pane's status."""
    ws = tiny_ws
    with serving(ws) as store:
        ws.append(ws.job_line("--sleep 1 --exit 3"))
        wait_until(lambda: getattr(store.job(1), "launched", False), timeout=20)
        filler = fill(ws.paths.root)
        panes = [
            "tmux",
            "-L",
            str(ws.settings.tmux_socket),
            "list-panes",
            "-a",
            "-F",
            "#{pane_dead}",
        ]

        def dead() -> bool:
            res = subprocess.run(panes, capture_output=True, text=True, check=False)
            return "1" in res.stdout

        wait_until(dead)
        assert not ws.paths.exit_file(1).exists()
        filler.unlink()
        wait_until(lambda: job_status(store, 1) == JobState.FAILED, timeout=20)
        job = store.job(1)
        assert job is not None and job.exit_code == 3
        assert any("from tmux" in detail for _, _, detail in store.history(1))


# ---- read-only state directory --------------------------------------------------------------


def test_read_only_state_directory(tiny_ws: Workspace, capsys: pytest.CaptureFixture[str]) -> None:
    ws = tiny_ws
    ws.append(line(ws, "a"))  # no scheduler yet: read at the start that succeeds
    ws.store.close()  # (a file open for writing would make the remount fail: EBUSY)
    state = str(ws.paths.root)
    subprocess.run(["mount", "-o", "remount,ro", state], check=True)
    try:
        res = start_process(ws)
        assert res.returncode == EXIT_STORAGE, res.stderr
        assert f"state directory {state} is read-only" in res.stderr, res.stderr
        assert "Traceback" not in res.stderr
        code, err = cli(capsys, ws, "status")
        assert code == EXIT_STORAGE and "read-only" in err and err.count("\n") == 1, err
    finally:
        subprocess.run(["mount", "-o", "remount,rw", state], check=True)
    with serving(ws) as store:
        ws.append(line(ws, "b"))
        wait_until(lambda: completed(store, 2), timeout=20)
    assert ran(ws) == ["a", "b"]


def test_pass_faults_log_once_and_stop_on_corruption(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The loop's side of it, without a loop: one line per fault, one when it clears, and a
    corrupt database ends the loop (serve then sets it aside, as at start)."""
    caplog.set_level(logging.INFO, logger="gpusched")
    store = Store(tmp_path / "gpusched.db")
    faults = PassFaults(store.path)
    for _ in range(3):
        faults.failed(sqlite3.OperationalError("database or disk is full"))
    faults.failed(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "run" / "x")))
    assert len(messages(caplog, "no space left")) == 1
    faults.ok(store)
    faults.ok(store)
    assert len(messages(caplog, "usable again")) == 1
    assert "usable again" in store.events(1)[0][2]
    with pytest.raises(CorruptDatabaseError):
        faults.failed(sqlite3.DatabaseError("database disk image is malformed"))
    faults.failed(ValueError("a bug"))  # anything else: logged with its traceback, as before
    assert messages(caplog, "scheduler pass failed")
    store.close()
