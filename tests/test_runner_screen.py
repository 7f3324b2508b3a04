"""ScreenRunner against real GNU screen, each test on a private socket directory (SCREENDIR)."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from app import proctree
from app.launch import LaunchRequest, build_launch
from app.models import JobSpec, JobState
from app.paths import StatePaths
from app.reaper import Reaper
from app.runners import LaunchError
from app.runners import screen as scr
from app.runners.screen import ScreenRunner, parse_ls
from app.store import Store
from tests.helpers import wait_until

needs_screen = pytest.mark.skipif(shutil.which("screen") is None, reason="screen not installed")

_job_ids = iter(range(500, 10_000))

#: Socket paths (SCREENDIR/PID.NAME) must fit in 107 bytes: tmp_path may be too deep.
_SHORT_ENOUGH = 70


def make_job(
    paths: StatePaths, tmp_path: Path, body: str, *, args: str = "", job_id: int | None = None
) -> LaunchRequest:
    """Write `body` as a Python script under tmp_path and build its launch on GPU 0."""
    job_id = next(_job_ids) if job_id is None else job_id
    script = tmp_path / f"job{job_id}.py"
    script.write_text(body)
    return build_launch(
        job_id=job_id,
        script=str(script),
        conda_env="",
        args=args,
        gpus=[0],
        paths=paths,
        base_env=dict(os.environ),
        now=time.time(),
    )


def exit_record(req: LaunchRequest) -> dict[str, Any]:
    wait_until(req.exit_file.exists)
    return cast(dict[str, Any], json.loads(req.exit_file.read_text()))


def log_has(req: LaunchRequest, text: str) -> bool:
    return req.log_path.exists() and text in req.log_path.read_text(errors="replace")


def gone(pid: int) -> bool:
    info = proctree.read_proc(pid)
    return info is None or info.state in ("Z", "X")


def screen_ls(socket_dir: str) -> str:
    env = {**os.environ, "SCREENDIR": socket_dir}
    return subprocess.run(
        ["screen", "-ls"], env=env, capture_output=True, text=True, check=False
    ).stdout


def _quit_all(socket_dir: str) -> None:
    """Kill every job left in the directory, then quit every session in it."""
    runner = ScreenRunner(socket_dir)
    for name in runner.sessions():
        runner.kill(name, grace_s=1.0)
    env = {**os.environ, "SCREENDIR": socket_dir}
    for s in parse_ls(screen_ls(socket_dir))[0]:
        subprocess.run(["screen", "-S", s.id, "-X", "quit"], env=env, check=False)


@pytest.fixture
def socket_dir(tmp_path: Path) -> Iterator[str]:
    """A private SCREENDIR; every session in it is quit after the test."""
    path = str(tmp_path / "s")
    owned = len(path) > _SHORT_ENOUGH
    if owned:
        path = tempfile.mkdtemp(prefix="gs-", dir="/tmp")
    try:
        yield path
    finally:
        if Path(path).exists():
            _quit_all(path)
        if owned:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def runner(socket_dir: str) -> ScreenRunner:
    return ScreenRunner(socket_dir=socket_dir)


def ended(runner: ScreenRunner, req: LaunchRequest) -> bool:
    return req.session not in runner.sessions()


#: Runs until the file named by its first argument appears.
WAIT_FOR_FILE = """\
import os, sys, time
print("READY", flush=True)
while not os.path.exists(sys.argv[1]):
    time.sleep(0.02)
print("GOT-FILE", flush=True)
"""

DUMP = """\
import json, os, sys
out = sys.argv[1]
with open(out + ".tmp", "w") as f:
    json.dump({"argv": sys.argv[2:], "env": dict(os.environ)}, f)
os.replace(out + ".tmp", out)
for a in sys.argv[2:]:
    print("ARG:" + a)
"""


def test_parse_ls() -> None:
    text = (
        "There are screens on:\n"
        "\t123.gpujob_1_0_x\t(11/21/26 21:29:21)\t(Detached)\n"
        "\t456.user sess.with.dots\t(11/21/26 21:29:21)\t(Attached)\n"
        "\t789.gpujob_2_0_y\t(11/21/26 21:29:21)\t(Dead ???)\n"
        "Remove dead screens with 'screen -wipe'.\n"
        "3 Sockets in /tmp/s d.\n"
    )
    sockets, sockdir = parse_ls(text)
    assert sockdir == "/tmp/s d"
    assert [s.id for s in sockets] == [
        "123.gpujob_1_0_x",
        "456.user sess.with.dots",
        "789.gpujob_2_0_y",
    ]
    assert [s.dead for s in sockets] == [False, False, True]
    assert parse_ls("No Sockets found in /run/screen/S-me.\n\n") == ([], "/run/screen/S-me")
    assert parse_ls("Directory /x must have mode 700.\n") == ([], None)


def test_render_tail_draws_like_a_terminal() -> None:
    raw = (
        "skipped partial line\r\n"
        "\x1b[31mred\x1b[0m text\r\n"
        "héllo ✓\r\n"
        "\rprogress 1\rprogress 2\rprogress 3   \r\n"
        "\x1b]0;title\x07after title\x1b(B\x1b[m\r\n"
        "\r\n\r\n"
    ).encode()
    expected = ["red text", "héllo ✓", "progress 3", "after title"]
    assert scr.render_tail(raw, 10, partial_first=True) == expected
    assert scr.render_tail(raw, 2, partial_first=False) == ["progress 3", "after title"]
    assert scr.render_tail(raw, 0, partial_first=False) == []


@needs_screen
def test_exit_code_and_output_recorded(
    runner: ScreenRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    req = make_job(state_paths, tmp_path, "import sys\nprint('FIRST-LINE-7f3a')\nsys.exit(3)\n")
    launched = runner.launch(req)
    assert launched.session == req.session
    record = exit_record(req)
    assert record["exit_code"] == 3
    assert record["job_id"] == req.job_id
    assert isinstance(record["pid"], int)
    assert record["started_at"] <= record["ended_at"]
    # The session ends with the wrapper; the record, written first, tells how.
    wait_until(lambda: ended(runner, req))
    wait_until(lambda: log_has(req, "FIRST-LINE-7f3a"))
    assert req.log_path.read_bytes().startswith(b"FIRST-LINE-7f3a")  # from the first byte
    runner.remove(req.session)  # already gone: no error
    runner.kill(req.session)
    assert not list(state_paths.exits.glob(".*.tmp"))
    assert not list(req.spec_file.parent.glob("*.screenrc"))
    assert stat.S_IMODE(req.spec_file.stat().st_mode) == 0o600


@needs_screen
def test_running_session_reported_until_the_job_ends(
    runner: ScreenRunner, socket_dir: str, state_paths: StatePaths, tmp_path: Path
) -> None:
    env = {**os.environ, "SCREENDIR": socket_dir}
    subprocess.run(["screen", "-dmS", "user_session", "sleep", "1000"], env=env, check=True)
    wait_until(lambda: "user_session" in screen_ls(socket_dir))
    assert runner.sessions() == {}  # only the scheduler's sessions
    flag = tmp_path / "go"
    req = make_job(state_paths, tmp_path, WAIT_FOR_FILE, args=str(flag))
    launched = runner.launch(req)
    assert launched.pid is not None
    wait_until(lambda: log_has(req, "READY"))
    assert set(runner.sessions()) == {req.session}
    state = runner.sessions()[req.session]
    assert state.alive
    assert state.pid == launched.pid
    assert state.dead_status is None
    assert "wrapper.py" in Path(f"/proc/{state.pid}/cmdline").read_text()
    (sock,) = [s for s in parse_ls(screen_ls(socket_dir))[0] if s.name == req.session]
    # PID.NAME: a bare NAME would also match a session whose name only begins with it.
    attach = ["env", f"SCREENDIR={socket_dir}", "screen", "-r", sock.id]
    assert runner.attach_argv(req.session) == attach
    with pytest.raises(LaunchError, match="already exists"):
        runner.launch(req)
    assert runner.sessions()[req.session].alive  # the refused launch left it alone
    flag.touch()
    assert exit_record(req)["exit_code"] == 0
    wait_until(lambda: ended(runner, req))
    assert log_has(req, "GOT-FILE")
    assert "user_session" in screen_ls(socket_dir)


@needs_screen
def test_a_job_killed_from_outside_by_sigkill_is_recorded_137(
    runner: ScreenRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    flag = tmp_path / "never"
    req = make_job(state_paths, tmp_path, WAIT_FOR_FILE, args=str(flag))
    launched = runner.launch(req)
    wait_until(lambda: log_has(req, "READY"))
    assert launched.pid is not None
    (job,) = [
        p for p in proctree.descendants(launched.pid)
        if str(tmp_path) in Path(f"/proc/{p}/cmdline").read_text()
    ]  # fmt: skip
    os.kill(job, 9)
    assert exit_record(req)["exit_code"] == 137
    wait_until(lambda: ended(runner, req))


@needs_screen
def test_kill_takes_down_a_job_that_ignores_sigterm_and_its_children(
    runner: ScreenRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    pids_file = tmp_path / "pids.json"
    body = f"""\
import json, os, signal, subprocess, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
child = subprocess.Popen(["sleep", "1000"])
daemon = subprocess.Popen(["setsid", "sleep", "1000"])
with open({str(pids_file)!r} + ".tmp", "w") as f:
    json.dump([os.getpid(), child.pid, daemon.pid], f)
os.replace({str(pids_file)!r} + ".tmp", {str(pids_file)!r})
while True:
    time.sleep(1)
"""
    req = make_job(state_paths, tmp_path, body)
    launched = runner.launch(req)
    assert launched.pid is not None
    wait_until(pids_file.exists)
    pids: list[int] = json.loads(pids_file.read_text())
    daemon = pids[-1]
    # Wait for `setsid` to have left the window's session (then it execs sleep).
    wait_until(lambda: (i := proctree.read_proc(daemon)) is not None and i.sid == daemon)
    started = time.monotonic()
    runner.kill(req.session, grace_s=1.0)
    assert time.monotonic() - started < 5
    for pid in [launched.pid, *pids]:
        wait_until(functools.partial(gone, pid))
    assert req.session not in runner.sessions()
    assert parse_ls(screen_ls(runner.socket_dir or ""))[0] == []
    runner.kill(req.session)  # already gone: no error


@needs_screen
def test_pane_tail_shows_a_running_job_until_killed(
    runner: ScreenRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    body = """\
import sys, time
for i in range(100):
    print("line", i)
print("\\x1b[32mgreen\\x1b[0m héllo ✓ █▌")
for i in range(5):
    print(f"\\rprogress {i}", end="", flush=True)
time.sleep(1000)
"""
    req = make_job(state_paths, tmp_path, body)
    runner.launch(req)
    wait_until(lambda: log_has(req, "progress 4"))
    tail = runner.pane_tail(req.session, lines=3)
    assert tail == ["line 99", "green héllo ✓ █▌", "progress 4"]
    assert len(runner.pane_tail(req.session)) == 50
    runner.kill(req.session)
    assert runner.pane_tail(req.session) == []
    assert exit_record(req)["exit_code"] == 143  # the wrapper forwarded SIGTERM


@needs_screen
def test_arguments_reach_the_script_literally(
    runner: ScreenRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    marker = Path(f"/tmp/should_not_exist_{uuid.uuid4().hex}")
    out = tmp_path / "dump.json"
    req = make_job(
        state_paths,
        tmp_path,
        DUMP,
        args=f"{out} --x ';echo pwned' '$(touch {marker})' \"a b\" 'q\"uo'\"'\"'te' '%n ^A'",
    )
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    dumped = json.loads(out.read_text())
    assert dumped["argv"][:3] == ["--x", ";echo pwned", f"$(touch {marker})"]
    assert dumped["argv"][3:] == ["a b", "q\"uo'te", "%n ^A", "--cuda", "0"]
    assert "STY" not in dumped["env"]  # the job does not think it runs in the user's screen
    assert dumped["env"]["GPUSCHED_JOB_ID"] == str(req.job_id)
    wait_until(lambda: log_has(req, "ARG:%n ^A"))
    log = req.log_path.read_text()
    assert f"ARG:$(touch {marker})" in log
    assert "\npwned" not in log
    assert not marker.exists()


@needs_screen
def test_log_path_with_screen_escape_characters(
    runner: ScreenRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    path = "/tmp/a%b^c%%d^^e/log %n ^A.log"
    assert scr.escape_logfile(path) == "/tmp/a%%b^^c%%%%d^^^^e/log %%n ^^A.log"
    assert scr.unescape_logfile(scr.escape_logfile(path)) == path
    req = make_job(state_paths, tmp_path, "print('ESCAPED-LOG-OK')\n")
    odd = tmp_path / "logs %n %% ^A ^^ $HOME 'q' \"d\""
    req = dataclasses.replace(req, log_path=odd / req.log_path.name)
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    wait_until(lambda: log_has(req, "ESCAPED-LOG-OK"))
    assert [p.name for p in odd.iterdir()] == [req.log_path.name]


@needs_screen
def test_a_dead_server_is_not_a_session_and_its_name_can_be_reused(
    runner: ScreenRunner, socket_dir: str, state_paths: StatePaths, tmp_path: Path
) -> None:
    req = make_job(state_paths, tmp_path, WAIT_FOR_FILE, args=str(tmp_path / "never"))
    runner.launch(req)
    wait_until(lambda: log_has(req, "READY"))
    (sock,) = parse_ls(screen_ls(socket_dir))[0]
    os.kill(sock.pid, signal.SIGKILL)  # its socket stays behind: "(Dead ???)"
    wait_until(lambda: "Dead" in screen_ls(socket_dir))
    assert req.session not in runner.sessions()
    # The closed terminal hung up the wrapper, which passed it on and recorded the end.
    assert exit_record(req)["exit_code"] == 128 + signal.SIGHUP
    flag = tmp_path / "go"
    again = make_job(state_paths, tmp_path, WAIT_FOR_FILE, args=str(flag), job_id=req.job_id)
    assert again.session == req.session
    runner.launch(again)
    assert runner.sessions()[req.session].alive
    assert "Dead" not in screen_ls(socket_dir)
    flag.touch()
    wait_until(lambda: ended(runner, again))


@needs_screen
def test_reaper_records_the_exit_code_of_a_finished_job(
    runner: ScreenRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    store = Store(state_paths.db)
    try:
        reaper = Reaper(store, state_paths, runner, runner_id="screen:test")
        done = make_job(state_paths, tmp_path, "import sys\nsys.exit(3)\n", job_id=1)
        vanished = make_job(state_paths, tmp_path, WAIT_FOR_FILE, args="x", job_id=2)
        specs = [JobSpec(0, r.argv[1], "", "", None) for r in (done, vanished)]
        store.ingest("jobs.txt", "{}", Counter(), [], specs, [], 1000.0)
        for r in (done, vanished):
            store.transition(
                r.job_id, JobState.RUNNING, when=[JobState.PENDING], session=r.session, launched=1
            )
        runner.launch(done)
        wrapper = runner.launch(vanished).pid
        assert wrapper is not None
        wait_until(lambda: ended(runner, done))
        os.kill(wrapper, signal.SIGKILL)  # no exit record can be written
        wait_until(lambda: ended(runner, vanished))
        ended_states = dict(reaper.reap(time.time(), check_sessions=True))
        assert ended_states == {1: JobState.FAILED, 2: JobState.LOST}
        job = store.job(1)
        assert job is not None
        assert job.exit_code == 3
    finally:
        store.close()


@needs_screen
def test_no_sessions_and_clear_launch_errors(
    runner: ScreenRunner,
    socket_dir: str,
    state_paths: StatePaths,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    Path(socket_dir).mkdir(mode=0o755)
    Path(socket_dir).chmod(0o755)  # screen refuses it so: the runner makes it private
    assert runner.sessions() == {}
    assert stat.S_IMODE(Path(socket_dir).stat().st_mode) == 0o700
    assert runner.pane_tail("gpujob_1_0_x") == []
    runner.remove("gpujob_1_0_x")
    runner.kill("gpujob_1_0_x")
    req = make_job(state_paths, tmp_path, "pass\n")
    deep = ScreenRunner(str(tmp_path / ("d" * 100)))
    with pytest.raises(LaunchError, match="too long"):
        deep.launch(req)
    with pytest.raises(LaunchError, match="too long for screen"):
        runner.launch(dataclasses.replace(req, session="gpujob_" + "x" * 80))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(LaunchError, match="not installed"):
        runner.launch(req)


def test_attach_argv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no screen: no lookup either
    assert ScreenRunner().attach_argv("gpujob_1_0_x") == ["screen", "-r", "gpujob_1_0_x"]
    private = ScreenRunner(str(tmp_path / "s"))
    expected = ["env", f"SCREENDIR={tmp_path / 's'}", "screen", "-r", "gpujob_1_0_x"]
    assert private.attach_argv("gpujob_1_0_x") == expected
