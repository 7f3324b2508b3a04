"""The dashboard in a real terminal: a pane of a second private tmux server.

The dashboard (a real `python -m app ...` process) draws into a 160x45 pane of an "outer" tmux
server; the jobs run on the scheduler's own private server (`tmux_socket`). The tests type with
`tmux send-keys` and read the screen with `tmux capture-pane -p`, so they cover what only a
terminal shows: drawing, keys, handing the terminal to a nested `tmux attach` and taking it
back, and what quitting leaves running.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import closing
from pathlib import Path

import pytest

from app.control import read_pid, scheduler_pid
from app.models import JobState
from app.paths import StatePaths
from app.service import serve
from app.store import Store
from tests.helpers import wait_until
from tests.workspace import Workspace, make_workspace

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

REPO = Path(__file__).resolve().parent.parent
#: Generous: CI machines are slow and Textual takes a while to start on them.
WAIT = 15.0
WIDTH, HEIGHT = 160, 45
#: The outer server: no status line (the pane is the whole window), panes stay after exit.
OUTER_CONF = "set -g status off\nset -g remain-on-exit on\nset -g history-limit 1000\n"


class Terminal:
    """One pane of a private tmux server, standing in for the user's terminal."""

    def __init__(self, root: Path) -> None:
        self.socket = f"gpusched_term_{uuid.uuid4().hex[:12]}"
        self.root = root
        self.conf = root / "outer.tmux.conf"
        self.conf.write_text(OUTER_CONF)
        self.target = "dash"
        bin_dir = str(Path(sys.executable).parent)
        # A small, explicit environment: no $TMUX (the pytest run may itself be inside tmux),
        # no TEXTUAL* settings; `app` importable and `python` the interpreter running the tests.
        self.env = {
            "PATH": f"{bin_dir}:/usr/local/bin:/usr/bin:/bin",
            "HOME": os.environ.get("HOME", str(root)),
            "LANG": "C.UTF-8",
            "PYTHONPATH": str(REPO),
            "TERM": "xterm-256color",
        }

    def tmux(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["tmux", "-L", self.socket, "-f", str(self.conf), *args],
            capture_output=True,
            text=True,
            env=self.env,
            check=check,
            timeout=WAIT,
        )

    def start(self, argv: Sequence[str]) -> None:
        """Run `argv` in the pane (exec'd: the pane's process is the program itself)."""
        command = "exec " + shlex.join(argv)
        self.tmux("new-session", "-d", "-s", self.target, "-x", str(WIDTH), "-y", str(HEIGHT),
                  "-c", str(REPO), command)  # fmt: skip

    def screen(self, history: bool = False) -> str:
        """What the pane shows; with `history`, also what scrolled off the top.

        Once the program ended, tmux writes "Pane is dead" below the last line and so scrolls
        the screen by one: what the program printed last may be in the history by then.
        """
        scroll = ("-S", "-") if history else ()
        res = self.tmux("capture-pane", "-p", *scroll, "-t", self.target, check=False)
        return res.stdout if res.returncode == 0 else ""

    def wait_for(self, *texts: str, timeout: float = WAIT, history: bool = False) -> str:
        """The screen once it shows every one of `texts`; fails with the screen otherwise."""
        try:
            return wait_until(
                lambda: _having(self.screen(history), texts), timeout=timeout, interval=0.05
            )
        except AssertionError:
            screen = self.screen(history)
            raise AssertionError(f"never saw {texts!r}; the screen:\n{screen}") from None

    def keys(self, *keys: str) -> None:
        self.tmux("send-keys", "-t", self.target, *keys)

    def pane(self, fmt: str) -> str:
        return self.tmux("display-message", "-p", "-t", self.target, fmt).stdout.strip()

    def exit_status(self, timeout: float = WAIT) -> int:
        """Wait for the pane's program to end: its exit status, -N if killed by signal N."""

        def ended() -> str:
            fmt = "#{pane_dead}:#{pane_dead_status}:#{pane_dead_signal}:#{pid}"
            dead, status, sig, server = self.pane(fmt).split(":")
            if dead != "1":
                return ""
            if status or sig:
                return status or f"-{sig}"
            # The terminal closed but tmux has not reaped the program yet. tmux built with
            # libutempter can miss that SIGCHLD for good (tmux/tmux#311, #4559): its helper
            # swaps in its own SIGCHLD handler while tmux tears the pane down. Another
            # SIGCHLD makes the server reap every child that has exited (waitpid WNOHANG).
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(server), signal.SIGCHLD)
            return ""

        try:
            return int(wait_until(ended, timeout=timeout, interval=0.05))
        except AssertionError:
            raise AssertionError(f"the program did not end; the screen:\n{self.screen()}") from None

    def kill(self) -> None:
        """Kill the server (and so the pane's program) and remove its socket file."""
        res = self.tmux("display-message", "-p", "#{socket_path}", check=False)
        self.tmux("kill-server", check=False)
        if res.returncode == 0 and res.stdout.strip():
            Path(res.stdout.strip()).unlink(missing_ok=True)


def _having(screen: str, texts: Sequence[str]) -> str:
    return screen if all(text in screen for text in texts) else ""


@pytest.fixture
def terminal(tmp_path: Path) -> Iterator[Terminal]:
    term = Terminal(tmp_path)
    try:
        yield term
    finally:
        term.kill()


def jobs_tmux(socket: str, *args: str) -> subprocess.CompletedProcess[str]:
    """A command to the jobs' own tmux server."""
    return subprocess.run(
        ["tmux", "-L", socket, *args], capture_output=True, text=True, check=False, timeout=WAIT
    )


def session_alive(socket: str, session: str) -> bool:
    return jobs_tmux(socket, "has-session", "-t", f"={session}").returncode == 0


def attached_sessions(socket: str) -> list[str]:
    """Sessions of the jobs' server that a client is attached to."""
    res = jobs_tmux(socket, "list-clients", "-F", "#{client_session}")
    return res.stdout.split() if res.returncode == 0 else []


def jobs_in(paths: StatePaths) -> dict[int, tuple[JobState, str]]:
    """Job id → (state, session), read on a connection of our own."""
    with closing(Store(paths.db)) as store:
        return {job.id: (job.status, job.session or "") for job in store.jobs()}


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs; a zombie (exited, not reaped yet: its parent died) does not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def scheduler_processes(paths: StatePaths) -> set[int]:
    """This test's `python -m app start ...` processes: their argv names its own state dir."""
    pids = set()
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if argv[1:4] == ["-m", "app", "start"] and str(paths.root) in argv:
            pids.add(int(proc.name))
    owner = scheduler_pid(paths)
    if owner is not None and owner > 0:
        pids.add(owner)
    pids.discard(os.getpid())
    return {pid for pid in pids if pid_alive(pid)}


def stop_schedulers(paths: StatePaths) -> None:
    """Teardown: end every scheduler the test started on `paths`, in a terminal or detached.

    SIGTERM first (a scheduler stops cleanly), SIGKILL what is left after WAIT seconds. Looks
    again after each round: a `start --tui` killed mid-quit may just have forked its
    background successor.
    """
    deadline = time.monotonic() + WAIT
    while pids := scheduler_processes(paths):
        late = time.monotonic() > deadline
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL if late else signal.SIGTERM)
        with contextlib.suppress(AssertionError):
            wait_until(lambda pids=pids: not any(map(pid_alive, pids)), timeout=WAIT)
        if late:
            return


def wait_for_lock(paths: StatePaths, pid: int) -> None:
    """Wait until scheduler `pid` holds the state directory's lock.

    Polls the pid the lock file names, not `scheduler_pid()`: that probe takes the lock
    shared for an instant, and a scheduler starting at that instant refuses to run
    ("another gpusched scheduler (pid None) is already running").
    """
    wait_until(lambda: read_pid(paths.lock) == pid, timeout=WAIT)
    assert scheduler_pid(paths) == pid  # held now: probing is harmless


def append_jobs(ws: Workspace, *args: str) -> None:
    """Append job lines to the jobs file as a user would (the scheduler watches the file)."""
    with ws.jobs_file.open("a") as f:
        f.writelines(ws.job_line(a) + "\n" for a in args)


# ---- a scheduler in a thread of the test, the dashboard in the terminal -------------------------


@pytest.fixture
def scheduler(tmp_path: Path, tmux_socket: str) -> Iterator[Workspace]:
    """A real scheduler (fake GPUs, private jobs socket) running in a thread of the test."""
    ws = make_workspace(tmp_path, tmux_socket, gpus=2)
    ws.store.close()
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(ws.settings, stop, False), daemon=True)
    thread.start()
    try:
        wait_for_lock(ws.paths, os.getpid())
        yield ws
    finally:
        stop.set()
        thread.join(timeout=WAIT)


def test_dashboard_attach_detach_and_quit_in_a_real_terminal(
    scheduler: Workspace, terminal: Terminal, tmux_socket: str
) -> None:
    ws = scheduler
    append_jobs(
        ws,
        "--llm half --sleep 60 --name a",
        "--llm half --sleep 60 --name b",
        "--llm quarter --exit 3",
    )
    terminal.start([sys.executable, "-m", "app", "dashboard", "--state-dir", str(ws.paths.root)])
    terminal.wait_for(f"scheduler running (pid {os.getpid()}", "2 running", "1 failed")
    states = jobs_in(ws.paths)
    running = sorted(i for i, (state, _) in states.items() if state == JobState.RUNNING)
    assert len(running) == 2 and states[3][0] == JobState.FAILED

    terminal.keys("2")  # the Running tab: both running jobs, not the failed one
    screen = terminal.wait_for("Running 2", "2 jobs", "Job #1 ▶ running")
    table = [line for line in screen.splitlines() if "▶ running" in line and "Job #" not in line]
    assert [line.split()[0] for line in table] == ["1", "2"], screen
    assert "✗ failed" not in screen

    # `a` on the first row: the dashboard hands the terminal to a nested `tmux attach`.
    attach_and_detach(terminal, ws, tmux_socket, "a", job_id=1, name="a")
    # Down, then Enter (DataTable's row selection) attaches too, to the second job.
    terminal.keys("Down")
    terminal.wait_for("Job #2 ▶ running")
    attach_and_detach(terminal, ws, tmux_socket, "Enter", job_id=2, name="b")

    terminal.keys("q")
    assert terminal.exit_status() == 0
    # Quitting the dashboard leaves the jobs and the scheduler alone.
    sessions = {jobs_in(ws.paths)[i][1] for i in (1, 2)}
    assert all(session_alive(tmux_socket, s) for s in sessions), sessions
    assert {state for state, _ in jobs_in(ws.paths).values()} == {JobState.RUNNING, JobState.FAILED}
    assert scheduler_pid(ws.paths) == os.getpid()


def attach_and_detach(
    terminal: Terminal, ws: Workspace, socket: str, key: str, *, job_id: int, name: str
) -> None:
    """Attach to job `job_id` with `key`, see its own pane, detach, see the dashboard again."""
    session = jobs_in(ws.paths)[job_id][1]
    assert session and not attached_sessions(socket)
    terminal.keys(key)
    wait_until(lambda: attached_sessions(socket) == [session], timeout=WAIT)
    # The job's own pane fills the terminal: its output, no dashboard around it.
    screen = wait_until(
        lambda: _lacking(
            terminal.screen(), "scheduler running", f"started --llm half --sleep 60 --name {name}"
        ),
        timeout=WAIT,
    )
    assert "p pause GPU" not in screen
    res = jobs_tmux(socket, "detach-client", "-s", session)
    assert res.returncode == 0, res.stderr
    terminal.wait_for("scheduler running", f"back from job {job_id}", f"Job #{job_id} ▶ running")
    assert not attached_sessions(socket)
    assert session_alive(socket, session)


def _lacking(screen: str, absent: str, present: str) -> str:
    return screen if absent not in screen and present in screen else ""


# ---- `start --tui`: the scheduler inside the dashboard's own process ----------------------------


@pytest.fixture
def tui(tmp_path: Path, tmux_socket: str) -> Iterator[tuple[Workspace, Terminal]]:
    """A workspace (nothing running yet) and a terminal; teardown stops whatever scheduler
    the test left behind, in the terminal or in the background."""
    ws = make_workspace(tmp_path, tmux_socket, gpus=2)
    ws.store.close()
    term = Terminal(tmp_path)
    try:
        yield ws, term
    finally:
        term.kill()
        stop_schedulers(ws.paths)


def tui_argv(ws: Workspace) -> list[str]:
    return [sys.executable, "-m", "app", "start", "--tui",
            "--state-dir", str(ws.paths.root),
            "--jobs-file", str(ws.jobs_file),
            "--llm-config", str(ws.root / "llm_config.json"),
            "--gpu-backend", "fake", "--fake-gpus", str(ws.root / "gpus.json"),
            "--tmux-socket", str(ws.settings.tmux_socket),
            "--ramp-up", "0"]  # fmt: skip


def start_tui_with_a_job(ws: Workspace, terminal: Terminal) -> int:
    """`start --tui` in the terminal, one job appended and seen running; the pane's pid."""
    terminal.start(tui_argv(ws))
    pid = int(terminal.pane("#{pane_pid}"))
    terminal.wait_for(f"scheduler running (pid {pid}", "no jobs yet")
    assert scheduler_pid(ws.paths) == pid
    append_jobs(ws, "--llm half --sleep 60 --name a")
    terminal.wait_for("1 running", "Running 1")
    terminal.keys("2")
    terminal.wait_for("Job #1 ▶ running", "started --llm half --sleep 60 --name a")
    return pid


def quit_question(terminal: Terminal) -> None:
    terminal.keys("q")
    terminal.wait_for("Keep the scheduler running in the background (b)", "Stop the scheduler (s)")


def test_start_tui_quit_keeps_the_scheduler_in_the_background(
    tui: tuple[Workspace, Terminal],
) -> None:
    ws, terminal = tui
    tui_pid = start_tui_with_a_job(ws, terminal)
    session = jobs_in(ws.paths)[1][1]

    quit_question(terminal)
    terminal.keys("c")  # cancel: the question goes, the dashboard stays
    wait_until(lambda: "Stop the scheduler (s)" not in terminal.screen(), timeout=WAIT)
    terminal.wait_for("Job #1 ▶ running", f"scheduler running (pid {tui_pid}")
    quit_question(terminal)
    terminal.keys("b")

    assert terminal.exit_status() == 0
    said = terminal.wait_for("keeps running in the background (pid ", history=True)
    match = re.search(r"in the background \(pid (\d+)\)", said)
    assert match, said
    background = int(match.group(1))
    assert background != tui_pid
    # The relaunched scheduler owns the state directory, re-adopts job 1 and starts new jobs.
    wait_for_lock(ws.paths, background)
    assert not pid_alive(tui_pid)
    assert session_alive(ws.settings.tmux_socket or "", session)
    append_jobs(ws, "--llm half --sleep 60 --name b")
    wait_until(lambda: jobs_in(ws.paths).get(2, (None, ""))[0] == JobState.RUNNING, timeout=WAIT)
    assert jobs_in(ws.paths)[1] == (JobState.RUNNING, session)

    os.kill(background, signal.SIGTERM)
    wait_until(lambda: scheduler_pid(ws.paths) is None and not pid_alive(background), WAIT)
    assert session_alive(ws.settings.tmux_socket or "", session)  # jobs outlive the scheduler


def test_start_tui_quit_can_stop_the_scheduler(tui: tuple[Workspace, Terminal]) -> None:
    ws, terminal = tui
    tui_pid = start_tui_with_a_job(ws, terminal)
    session = jobs_in(ws.paths)[1][1]

    quit_question(terminal)
    terminal.keys("s")

    assert terminal.exit_status() == 0
    terminal.wait_for("gpusched: scheduler stopped", history=True)
    assert scheduler_pid(ws.paths) is None
    assert not pid_alive(tui_pid)
    # Stopping the scheduler leaves the job running, for the next start to re-adopt.
    assert session_alive(ws.settings.tmux_socket or "", session)
    assert jobs_in(ws.paths)[1] == (JobState.RUNNING, session)
