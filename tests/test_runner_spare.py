"""Spare wrappers (started ahead of their job), the lean wrapper, and tmux's deferred removal."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from app import wrapper
from app.launch import LaunchRequest, build_launch
from app.paths import StatePaths
from app.runners import TmuxRunner
from app.runners.common import SPARES
from app.runners.direct import DirectRunner, kill_orphan
from app.runners.spare import SPARE_PREFIX, spare_argv
from tests.helpers import wait_until

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
_ids = iter(range(500, 10_000))

#: Records its argv, pid, cwd and stdin kind, then sleeps ARGV[2] seconds.
JOB = """\
import json, os, stat, sys, time
with open(sys.argv[1] + ".tmp", "w") as f:
    json.dump({"argv": sys.argv[1:], "pid": os.getpid(), "cwd": os.getcwd(),
               "stdin_tty": os.isatty(0), "stdin_chr": stat.S_ISCHR(os.fstat(0).st_mode),
               "job_id": os.environ.get("GPUSCHED_JOB_ID")}, f)
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
time.sleep(float(sys.argv[2]))
"""


def make_job(paths: StatePaths, tmp_path: Path, sleep: float = 0.0) -> tuple[LaunchRequest, Path]:
    job_id = next(_ids)
    script = tmp_path / "job.py"
    script.write_text(JOB)
    out = tmp_path / f"out_{job_id}.json"
    req = build_launch(
        job_id=job_id, script=str(script), conda_env="", args=f"{out} {sleep}", gpus=[0],
        paths=paths, base_env=dict(os.environ), now=time.time(),
    )  # fmt: skip
    return req, out


def seen(out: Path) -> dict[str, Any]:
    wait_until(out.exists, timeout=20)
    data: dict[str, Any] = json.loads(out.read_text())
    return data


def record(req: LaunchRequest) -> dict[str, Any]:
    wait_until(req.exit_file.exists, timeout=20)
    data: dict[str, Any] = json.loads(req.exit_file.read_text())
    return data


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# ---- the wrapper on its own --------------------------------------------------------------------


def test_wrapper_json_round_trip_without_the_json_package() -> None:
    text = json.dumps({"a": [1, 2.5, None, True], "é": 'x\n"y"', "n": {"k": -3}})
    assert wrapper.loads(text) == json.loads(text)
    assert wrapper.loads("  [1]\n") == [1]
    for bad in ("{", "[1] x", ""):
        with pytest.raises(ValueError):
            wrapper.loads(bad)
    rec = {"job_id": 3, "exit_code": 0, "started_at": 1.5, "ended_at": 2.25, "pid": None}
    assert json.loads(wrapper.dumps(rec)) == rec
    assert json.loads(wrapper.dumps({"s": 'q"\\é'})) == {"s": 'q"\\é'}


def test_exit_record_temp_file_stays_out_of_the_watched_folder(tmp_path: Path) -> None:
    exits, run = tmp_path / "exits", tmp_path / "run"
    run.mkdir()
    wrapper.write_exit_record(str(exits / "job_1.json"), {"exit_code": 0}, str(run))
    assert json.loads((exits / "job_1.json").read_text()) == {"exit_code": 0}
    assert [p.name for p in exits.iterdir()] == ["job_1.json"] and not any(run.iterdir())


def test_the_job_gets_default_signal_dispositions(tmp_path: Path) -> None:
    """Python ignores SIGPIPE and SIGXFSZ; a job must not inherit that (a shell job here: a
    Python job would ignore them again by itself)."""
    out, exit_file = tmp_path / "sigign", tmp_path / "exits" / "job_1.json"
    spec = {"job_id": 1, "argv": ["sh", "-c", f"grep SigIgn /proc/$$/status > {out}"],
            "env": dict(os.environ), "cwd": str(tmp_path), "exit_file": str(exit_file)}  # fmt: skip
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    subprocess.run([sys.executable, "-I", "-S", wrapper.__file__, str(tmp_path / "spec.json")],
                   check=True)  # fmt: skip
    ignored = int(out.read_text().split()[1], 16)
    assert ignored & ((1 << 12) | (1 << 24)) == 0  # bits of signals 13 and 25


def test_spare_on_stdin_runs_its_spec_and_refuses_another(
    state_paths: StatePaths, tmp_path: Path
) -> None:
    from app.runners.common import prepare_launch

    req, out = make_job(state_paths, tmp_path)
    prepare_launch(req, spare="tok1")
    ok = subprocess.run(spare_argv("tok1"), input=f"{req.spec_file}\n", text=True, check=False)
    assert ok.returncode == 0 and record(req)["exit_code"] == 0
    data = seen(out)
    assert data["stdin_chr"] and not data["stdin_tty"]  # /dev/null, not the spare's pipe
    assert data["cwd"] == req.cwd
    wrong = subprocess.run(spare_argv("other"), input=f"{req.spec_file}\n", text=True,
                           capture_output=True, check=False)  # fmt: skip
    assert wrong.returncode == wrapper.EXIT_BAD_SPEC and "not for this spare" in wrong.stderr
    # No job comes (EOF): the spare leaves, and not with 0 (a renamed session would read done).
    idle = subprocess.run(spare_argv("tok2"), input="", text=True, check=False)
    assert idle.returncode == wrapper.EXIT_BAD_SPEC


# ---- direct runner -------------------------------------------------------------------------------


def test_direct_runner_hands_the_next_job_to_a_waiting_spare(
    state_paths: StatePaths, tmp_path: Path
) -> None:
    runner = DirectRunner(echo=None, grace_s=2.0)
    try:
        first, _ = make_job(state_paths, tmp_path)
        runner.launch(first)
        assert record(first)["exit_code"] == 0
        assert len(runner._spares) == SPARES  # started after the first launch, waiting
        spare = runner._spares[0].proc.pid  # the oldest goes first
        assert alive(spare)
        second, out2 = make_job(state_paths, tmp_path, sleep=30)
        launched = runner.launch(second)
        assert launched.pid == spare  # no new wrapper: the spare took the job
        assert json.loads(second.spec_file.read_text())["spare"]
        data = seen(out2)
        assert data["job_id"] == str(second.job_id) and data["cwd"] == second.cwd
        assert data["stdin_chr"] and not data["stdin_tty"]
        # A new scheduler process (or the CLI) can still stop it: the spec names its token.
        assert not kill_orphan(os.getpid(), second.spec_file)
        assert kill_orphan(spare, second.spec_file, grace_s=2.0)
        assert record(second)["exit_code"] == 143
        wait_until(lambda: not alive(data["pid"]))
    finally:
        runner.close(grace_s=1.0)
    assert runner._spares == []  # the waiting spare was let go with the runner


def test_direct_runner_close_lets_its_spare_go(state_paths: StatePaths, tmp_path: Path) -> None:
    runner = DirectRunner(echo=None, grace_s=1.0)
    req, _ = make_job(state_paths, tmp_path)
    runner.launch(req)
    record(req)
    spares = [s.proc.pid for s in runner._spares]
    runner.close()
    wait_until(lambda: not any(alive(pid) for pid in spares), timeout=10)


# ---- tmux runner ---------------------------------------------------------------------------------


def tmux_sessions(socket: str) -> list[str]:
    res = subprocess.run(["tmux", "-L", socket, "list-sessions", "-F", "#{session_name}"],
                         capture_output=True, text=True, check=False)  # fmt: skip
    return res.stdout.split()


@needs_tmux
def test_tmux_launch_renames_the_spare_session(
    tmux_socket: str, state_paths: StatePaths, tmp_path: Path
) -> None:
    runner = TmuxRunner(socket_name=tmux_socket)
    first, _ = make_job(state_paths, tmp_path)
    runner.launch(first)
    assert record(first)["exit_code"] == 0
    spares = [s for s in tmux_sessions(tmux_socket) if s.startswith(SPARE_PREFIX)]
    assert len(spares) == SPARES and not set(spares) & set(runner.sessions())  # not jobs'
    spare = runner._spares[0]
    wait_until(lambda: all(s.opened() for s in runner._spares))
    second, out = make_job(state_paths, tmp_path, sleep=30)
    launched = runner.launch(second)
    assert launched.pid == spare.pid
    data = seen(out)
    assert data["stdin_tty"] and data["cwd"] == second.cwd  # the pane's terminal, as before
    state = runner.sessions()[second.session]
    assert state.alive and state.pid == spare.pid
    assert spare.session not in tmux_sessions(tmux_socket)  # renamed to the job's
    runner.kill(second.session, grace_s=2.0)
    assert record(second)["exit_code"] == 143
    # Letting the next spare go closes its session (the wrapper reads EOF and exits).
    runner.close_spares()
    wait_until(lambda: not any(s.startswith(SPARE_PREFIX) for s in tmux_sessions(tmux_socket)))


@needs_tmux
def test_a_dying_scheduler_takes_its_tmux_spare_along(
    tmux_socket: str, state_paths: StatePaths, tmp_path: Path
) -> None:
    req, _ = make_job(state_paths, tmp_path)
    code = (
        "import sys; from app.launch import LaunchRequest; from pathlib import Path\n"
        "from app.runners import TmuxRunner\n"
        f"r = TmuxRunner({tmux_socket!r})\n"
        f"r.launch(LaunchRequest({req.job_id}, {req.session!r}, {req.argv!r}, {req.env!r}, "
        f"{req.cwd!r}, Path({str(req.log_path)!r}), Path({str(req.exit_file)!r}), "
        f"Path({str(req.spec_file)!r}), ''))\n"
        "import os; os._exit(0)\n"  # no clean-up at all, as a crash
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)
    assert record(req)["exit_code"] == 0
    wait_until(lambda: not any(s.startswith(SPARE_PREFIX) for s in tmux_sessions(tmux_socket)))


@needs_tmux
def test_tmux_chores_wait_for_the_end_of_the_pass(
    tmux_socket: str, state_paths: StatePaths, tmp_path: Path
) -> None:
    runner = TmuxRunner(socket_name=tmux_socket)
    req, _ = make_job(state_paths, tmp_path)
    runner.launch(req)  # outside a pass: its spare is started at once
    record(req)
    assert len(runner._spares) == SPARES
    runner.begin_pass()
    runner.remove(req.session)
    again, _ = make_job(state_paths, tmp_path)
    wait_until(lambda: all(s.opened() for s in runner._spares))
    runner.launch(again)  # on a spare; the next spare is a chore
    runner.end_pass()
    assert len(runner._spares) == SPARES - 1 and runner.chores_since() is not None
    assert req.session in tmux_sessions(tmux_socket)  # not removed yet either
    runner.do_chores()  # one tmux call: the next spare, the finished session removed
    assert req.session not in tmux_sessions(tmux_socket)
    assert len(runner._spares) == SPARES and runner.chores_since() is None
    record(again)
    # A launch with the name of a session still to be removed removes it first.
    runner.begin_pass()
    runner.remove(again.session)
    same = build_launch(
        job_id=again.job_id, script=again.argv[1], conda_env="", args=" ".join(again.argv[2:4]),
        gpus=[0], paths=state_paths, base_env=dict(os.environ), now=time.time(),
    )  # fmt: skip
    assert same.session == again.session
    runner.launch(same)  # no "duplicate session"
    runner.end_pass()
    runner.do_chores(spare=False)  # as when the scheduler stops: no new spare
    assert record(same)["exit_code"] == 0
    runner.close_spares()


class ChoreRunner:
    def __init__(self, since: float | None) -> None:
        self.since = since
        self.done: list[bool] = []

    def chores_since(self) -> float | None:
        return self.since

    def do_chores(self, spare: bool = True) -> None:
        self.done.append(spare)


def test_chores_wait_for_a_quiet_moment_but_not_for_ever() -> None:
    import threading

    from app.runners.common import CHORES_LATEST_S, runner_chores

    wake = threading.Event()
    quiet = ChoreRunner(time.monotonic())
    runner_chores(quiet, wake)
    assert quiet.done == [True]  # nothing woke the scheduler meanwhile
    busy = ChoreRunner(time.monotonic())
    wake.set()
    runner_chores(busy, wake)
    assert busy.done == []  # a wake-up first: the next pass comes first
    late = ChoreRunner(time.monotonic() - CHORES_LATEST_S)
    runner_chores(late, wake)
    assert late.done == [True]  # but not for ever
    stopping = ChoreRunner(time.monotonic())
    runner_chores(stopping, None)
    assert stopping.done == [False]
    idle = ChoreRunner(None)
    runner_chores(idle, wake)
    runner_chores(object(), wake)  # a runner without chores
    assert idle.done == []


def remain_on_exit(socket: str, session: str) -> str:
    res = subprocess.run(
        ["tmux", "-L", socket, "show-options", "-w", "-v", "-t", f"={session}:", "remain-on-exit"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return res.stdout.strip()


@needs_tmux
def test_a_scheduler_dying_between_rename_and_hand_over_leaves_no_job_session(
    tmux_socket: str, state_paths: StatePaths, tmp_path: Path
) -> None:
    """The job's session must then vanish (the reaper puts a job whose launch was never
    confirmed back in the queue), not stay as a dead pane that reads as a failed job."""
    runner = TmuxRunner(socket_name=tmux_socket)
    first, _ = make_job(state_paths, tmp_path, sleep=30)
    runner.launch(first)
    assert remain_on_exit(tmux_socket, first.session) == "on"
    wait_until(lambda: all(s.opened() for s in runner._spares))
    spare = runner._take_spare()
    assert spare is not None
    res = runner._cmd("rename-session", "-t", f"={spare.session}", "gpujob_999_0_x")
    assert res.returncode == 0
    spare.close()  # what the scheduler's death does to its end of the FIFO
    wait_until(lambda: "gpujob_999_0_x" not in tmux_sessions(tmux_socket))
    # A job launched on a spare keeps its dead pane once its launch is complete.
    runner.begin_pass()
    second, _ = make_job(state_paths, tmp_path, sleep=30)
    runner.launch(second)
    runner.end_pass()
    assert remain_on_exit(tmux_socket, second.session) == "off"  # not yet: a chore
    runner.do_chores()
    assert remain_on_exit(tmux_socket, second.session) == "on"
    for req in (first, second):
        runner.kill(req.session, grace_s=1.0)
    runner.close_spares()
