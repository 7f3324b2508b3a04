"""DirectRunner: jobs as plain child processes, with real subprocesses (no mocks)."""

from __future__ import annotations

import json
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from app import proctree
from app.launch import LaunchRequest, build_launch
from app.models import JobSpec, JobState
from app.paths import StatePaths
from app.reaper import Reaper
from app.runners import LaunchError, RunnerError
from app.runners.direct import DirectRunner, LineSplitter, kill_orphan
from app.store import Store
from tests.helpers import wait_until

_job_ids = iter(range(100, 10_000))


class Sink:
    """A console sink collecting echoed lines (called from the runner's reader threads)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self._lock = threading.Lock()

    def __call__(self, line: str) -> None:
        with self._lock:
            self.lines.append(line)

    def of(self, req: LaunchRequest) -> list[str]:
        prefix = f"[job {req.job_id}] "
        with self._lock:
            return [line.removeprefix(prefix) for line in self.lines if line.startswith(prefix)]


def make_job(
    paths: StatePaths,
    tmp_path: Path,
    body: str,
    *,
    args: str = "",
    env: dict[str, str] | None = None,
    suffix: str = ".py",
) -> LaunchRequest:
    """Write `body` as a script under tmp_path and build its launch on GPU 0."""
    job_id = next(_job_ids)
    script = tmp_path / f"job{job_id}{suffix}"
    script.write_text(body)
    return build_launch(
        job_id=job_id,
        script=str(script),
        conda_env="",
        args=args,
        gpus=[0],
        paths=paths,
        base_env=dict(os.environ) if env is None else env,
        now=time.time(),
    )


def exit_record(req: LaunchRequest) -> dict[str, Any]:
    wait_until(req.exit_file.exists)
    record: dict[str, Any] = json.loads(req.exit_file.read_text())
    return record


def gone(pid: int) -> bool:
    info = proctree.read_proc(pid)
    return info is None or info.state in ("Z", "X")


def reaped(pid: int | None) -> Callable[[], bool]:
    """Not even a zombie is left: the runner collected the process."""
    assert pid is not None
    return lambda: proctree.read_proc(pid) is None


def is_gone(pid: int) -> Callable[[], bool]:
    return lambda: gone(pid)


def ended(runner: DirectRunner, req: LaunchRequest) -> Callable[[], bool]:
    return lambda: not runner.sessions()[req.session].alive


def read_pid(path: Path) -> int:
    wait_until(path.exists)
    return int(path.read_text())


def write_pid(path: Path, pid: str) -> str:
    """A line of Python writing `pid` (an expression) to `path` atomically."""
    tmp = f"{path}.tmp"
    return f"open({tmp!r}, 'w').write(str({pid})); os.replace({tmp!r}, {str(path)!r})\n"


DUMP = """\
import json, os, sys
out = sys.argv[1]
info = {"argv": sys.argv[2:], "env": dict(os.environ), "sid": os.getsid(0),
        "ppid": os.getppid(), "stdin": sys.stdin.read()}
with open(out + ".tmp", "w") as f:
    json.dump(info, f)
os.replace(out + ".tmp", out)
for a in sys.argv[2:]:
    print("ARG:" + a)
"""

SLEEPER = """\
import sys, time
print("READY")
time.sleep(1000)
"""


@pytest.fixture
def sink() -> Sink:
    return Sink()


@pytest.fixture
def runner(sink: Sink) -> Iterator[DirectRunner]:
    r = DirectRunner(echo=sink, grace_s=2.0)
    yield r
    r.close(grace_s=0.5)


def test_output_echoed_with_job_prefix_logged_raw_and_exit_code_kept(
    runner: DirectRunner, sink: Sink, state_paths: StatePaths, tmp_path: Path
) -> None:
    body = """\
import sys
for epoch in range(1, 4):
    print(f"epoch {epoch} loss 0.{epoch}")
print("warning on stderr", file=sys.stderr)
print("after stderr")
sys.exit(3)
"""
    req = make_job(state_paths, tmp_path, body)
    launched = runner.launch(req)
    assert launched.session == req.session
    record = exit_record(req)
    assert record["exit_code"] == 3
    assert record["job_id"] == req.job_id
    wait_until(ended(runner, req))
    state = runner.sessions()[req.session]
    assert state.dead_status == 3
    assert state.pid == launched.pid
    expected = [
        "epoch 1 loss 0.1",
        "epoch 2 loss 0.2",
        "epoch 3 loss 0.3",
        "warning on stderr",
        "after stderr",
    ]
    wait_until(lambda: len(sink.of(req)) == len(expected))
    assert sink.of(req) == expected
    assert sink.lines[0] == f"[job {req.job_id}] epoch 1 loss 0.1"
    assert req.log_path.read_bytes() == "".join(f"{line}\n" for line in expected).encode()
    assert runner.pane_tail(req.session, 2) == ["warning on stderr", "after stderr"]
    # The wrapper is reaped: no zombie is left behind.
    wait_until(reaped(launched.pid))
    runner.remove(req.session)
    assert req.session not in runner.sessions()
    runner.remove(req.session)  # already gone: no error


def test_partial_last_line_is_flushed_at_eof(
    runner: DirectRunner, sink: Sink, state_paths: StatePaths, tmp_path: Path
) -> None:
    req = make_job(state_paths, tmp_path, "import sys\nprint('one')\nsys.stdout.write('tail')\n")
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    wait_until(lambda: len(sink.of(req)) == 2)
    assert sink.of(req) == ["one", "tail"]
    assert req.log_path.read_bytes() == b"one\ntail"


def test_invalid_utf8_does_not_break_the_reader(
    runner: DirectRunner, sink: Sink, state_paths: StatePaths, tmp_path: Path
) -> None:
    raw = b"ok \xff\xfe bad\n\x80end\n\xe2\x82"  # ends inside a multi-byte character
    body = f"import os\nos.write(1, {raw!r})\nprint('still alive', flush=True)\n"
    req = make_job(state_paths, tmp_path, body)
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    wait_until(lambda: len(sink.of(req)) == 3)
    assert sink.of(req) == ["ok \ufffd\ufffd bad", "\ufffdend", "\ufffdstill alive"]
    assert req.log_path.read_bytes() == raw + b"still alive\n"


def test_progress_redraws_show_their_last_state_on_the_console(
    runner: DirectRunner, sink: Sink, state_paths: StatePaths, tmp_path: Path
) -> None:
    body = "import sys\nfor p in (10, 50, 100):\n    sys.stdout.write(f'\\r{p}%')\nprint()\n"
    req = make_job(state_paths, tmp_path, body)
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    wait_until(lambda: sink.of(req))
    assert sink.of(req) == ["100%"]
    assert req.log_path.read_bytes() == b"\r10%\r50%\r100%\n"
    assert runner.pane_tail(req.session) == ["100%"]


def test_line_splitter_across_chunks() -> None:
    s = LineSplitter(max_line=16)
    assert s.feed(b"ab") == []
    assert s.feed(b"c\r") == []
    assert s.feed(b"\nx\xe2\x82") == ["abc"]
    assert s.feed(b"\xac\n") == ["x€"]
    assert s.feed(b"1\r2\r3") == []
    assert s.feed(b"y" * 20) == ["3" + "y" * 20]  # too long without newline: flushed
    assert s.close() == []
    assert s.feed(b"\r\r") == []
    assert s.close() == []


def test_arguments_reach_the_script_literally(
    runner: DirectRunner, sink: Sink, state_paths: StatePaths, tmp_path: Path
) -> None:
    marker = Path(f"/tmp/should_not_exist_{uuid.uuid4().hex}")
    out = tmp_path / "dump.json"
    req = make_job(
        state_paths,
        tmp_path,
        DUMP,
        args=f"{out} --x ';echo pwned' '$(touch {marker})' \"a b\" 'it'\"'\"'s'",
    )
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    expected = ["--x", ";echo pwned", f"$(touch {marker})", "a b", "it's", "--cuda", "0"]
    assert json.loads(out.read_text())["argv"] == expected
    wait_until(lambda: len(sink.of(req)) == len(expected))
    assert sink.of(req) == [f"ARG:{a}" for a in expected]
    assert "pwned" not in sink.of(req)  # no shell ever ran `;echo pwned`
    assert not marker.exists()


def test_job_environment_stdin_and_own_session(
    runner: DirectRunner, state_paths: StatePaths, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The scheduler runs inside tmux: its terminal is not the job's.
    monkeypatch.setenv("TMUX", "/tmp/tmux-1/default,1,0")
    monkeypatch.setenv("TMUX_PANE", "%1")
    out = tmp_path / "dump.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["MY_JOB_VAR"] = "hello world"
    req = make_job(state_paths, tmp_path, DUMP, args=str(out), env=env)
    launched = runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    dumped = json.loads(out.read_text())
    assert dumped["env"]["MY_JOB_VAR"] == "hello world"
    assert dumped["env"]["GPUSCHED_JOB_ID"] == str(req.job_id)
    assert dumped["env"]["PYTHONUNBUFFERED"] == "1"  # a pipe would block-buffer Python
    assert "TMUX" not in dumped["env"]
    assert "TMUX_PANE" not in dumped["env"]
    assert dumped["stdin"] == ""  # /dev/null: a job reading stdin does not hang
    # The wrapper leads a new session: the job is out of the scheduler's terminal.
    assert dumped["sid"] == launched.pid == dumped["ppid"]
    assert dumped["sid"] != os.getsid(0)
    # The spec holds the environment: private, as for tmux.
    assert req.spec_file.stat().st_mode & 0o077 == 0


def test_running_session_reports_pid_and_rejects_duplicate(
    runner: DirectRunner, sink: Sink, state_paths: StatePaths, tmp_path: Path
) -> None:
    req = make_job(state_paths, tmp_path, SLEEPER)
    launched = runner.launch(req)
    wait_until(lambda: sink.of(req) == ["READY"])
    state = runner.sessions()[req.session]
    assert state.alive
    assert state.dead_status is None
    assert state.pid == launched.pid
    assert "wrapper.py" in Path(f"/proc/{state.pid}/cmdline").read_text()
    assert runner.attach_argv(req.session) == ["tail", "-f", str(req.log_path)]
    assert runner.pane_tail(req.session) == ["READY"]
    with pytest.raises(LaunchError, match="already exists"):
        runner.launch(req)
    runner.kill(req.session)
    assert req.session not in runner.sessions()
    # The wrapper forwarded SIGTERM and still recorded how the job ended.
    assert exit_record(req)["exit_code"] == 143
    wait_until(reaped(launched.pid))


def test_kill_takes_down_a_tree_that_ignores_sigterm(
    runner: DirectRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    child_pid, daemon_pid = tmp_path / "child.pid", tmp_path / "daemon.pid"
    body = (
        "import os, signal, subprocess, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "if os.fork() == 0:\n"
        "    " + write_pid(child_pid, "os.getpid()") + "    time.sleep(1000)\n"
        "p = subprocess.Popen(['setsid', 'sleep', '1000'])\n"
        + write_pid(daemon_pid, "p.pid")
        + "time.sleep(1000)\n"
    )
    req = make_job(state_paths, tmp_path, body)
    launched = runner.launch(req)
    child, daemon = read_pid(child_pid), read_pid(daemon_pid)
    # Wait for `setsid` to have left the wrapper's session (then it execs sleep).
    wait_until(lambda: (i := proctree.read_proc(daemon)) is not None and i.sid == daemon)
    started = time.monotonic()
    runner.kill(req.session, grace_s=0.5)
    assert time.monotonic() - started < 5
    assert launched.pid is not None
    for pid in (launched.pid, child, daemon):
        wait_until(is_gone(pid))
    wait_until(reaped(launched.pid))
    assert req.session not in runner.sessions()
    # SIGKILL reached the wrapper too. Whichever of the job and the wrapper it hit first, no
    # record says the job ended by itself: none, or the job's SIGKILL (137).
    assert not req.exit_file.exists() or exit_record(req)["exit_code"] == 137
    runner.kill(req.session)  # already gone: no error


def test_a_new_runner_sees_no_sessions_and_kills_orphans_by_pid(
    runner: DirectRunner, sink: Sink, state_paths: StatePaths, tmp_path: Path
) -> None:
    req = make_job(state_paths, tmp_path, SLEEPER)
    launched = runner.launch(req)
    assert launched.pid is not None
    wait_until(lambda: sink.of(req) == ["READY"])
    fresh = DirectRunner(echo=None)
    assert fresh.sessions() == {}
    assert fresh.pane_tail(req.session) == []
    with pytest.raises(RunnerError):
        fresh.attach_argv(req.session)
    fresh.kill(req.session)  # not its child: nothing happens
    fresh.remove(req.session)
    assert runner.sessions()[req.session].alive
    # Only the wrapper of that very spec is killed: never a reused pid.
    assert not kill_orphan(launched.pid, tmp_path / "other.json")
    assert not kill_orphan(os.getpid(), req.spec_file)
    assert kill_orphan(launched.pid, req.spec_file, grace_s=2.0)
    assert exit_record(req)["exit_code"] == 143
    wait_until(ended(runner, req))
    assert runner.sessions()[req.session].dead_status == 143
    assert not kill_orphan(launched.pid, req.spec_file)


def _running_job(store: Store, req: LaunchRequest) -> None:
    spec = JobSpec(0, req.argv[1], "", "", None, "jobs.txt:1")
    store.ingest("jobs.txt", "{}", Counter(), [], [spec], [], 1000.0)
    (job,) = store.jobs([JobState.PENDING])
    assert job.id == req.job_id
    store.transition(
        job.id,
        JobState.RUNNING,
        when=[JobState.PENDING],
        now=1001.0,
        session=req.session,
        runner="direct:1",
        launched=1,
    )


def test_restarted_scheduler_marks_unknown_children_lost_or_ended(
    runner: DirectRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    store = Store(state_paths.db)
    reaper = Reaper(store, state_paths, DirectRunner(echo=None), runner_id="direct:2")
    # Job 1 runs on, in the old scheduler's runner: the new one cannot re-adopt it.
    req = build_launch(
        job_id=1,
        script=str(tmp_path / "sleeper.py"),
        conda_env="",
        args="",
        gpus=[0],
        paths=state_paths,
        base_env=dict(os.environ),
        now=time.time(),
    )
    Path(req.argv[1]).write_text(SLEEPER)
    _running_job(store, req)
    launched = runner.launch(req)
    assert launched.pid is not None
    assert reaper.reconcile(time.time()) == [(1, JobState.LOST)]
    assert runner.sessions()[req.session].alive  # still running: kill_orphan() is needed
    assert kill_orphan(launched.pid, req.spec_file, grace_s=2.0)
    store.close()


def test_close_stops_running_children(
    runner: DirectRunner, sink: Sink, state_paths: StatePaths, tmp_path: Path
) -> None:
    reqs = [make_job(state_paths, tmp_path, SLEEPER) for _ in range(2)]
    done = make_job(state_paths, tmp_path, "print('bye')\n")
    pids = [runner.launch(r).pid for r in reqs]
    runner.launch(done)
    wait_until(lambda: all(sink.of(r) == ["READY"] for r in reqs))
    wait_until(ended(runner, done))
    started = time.monotonic()
    assert sorted(runner.close(grace_s=2.0)) == sorted(r.session for r in reqs)
    assert time.monotonic() - started < 5  # one grace period for all, not one each
    assert runner.sessions() == {}
    for pid in pids:
        wait_until(reaped(pid))
    assert [exit_record(r)["exit_code"] for r in reqs] == [143, 143]


def test_missing_command_and_failing_sink(
    state_paths: StatePaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(line: str) -> None:
        raise OSError("console gone")

    runner = DirectRunner(echo=broken)
    try:
        missing = make_job(state_paths, tmp_path, "", suffix=".bin")
        Path(missing.argv[0]).unlink()
        runner.launch(missing)
        assert exit_record(missing)["exit_code"] == 127
        # The sink failed: the log still gets everything.
        wait_until(lambda: b"gpusched: cannot run" in missing.log_path.read_bytes())
        wait_until(lambda: "echo disabled" in caplog.text)
    finally:
        runner.close()
