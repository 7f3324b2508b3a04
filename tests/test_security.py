"""Security of the running scheduler, with real parts: files with real modes, `gpusched` as a
process, a private tmux server, real jobs. docs/security.md describes what is tested here.

- inputs others can change are refused at start (`--no-strict-modes` overrides) and not read
  while they stay so (reported like a malformed line), then read again once fixed;
- what gpusched creates is private (0700 / 0600), whatever the umask, while jobs keep theirs;
- tmux socket names and session names cannot reach another socket or session;
- conda environments and GPU ids are checked before they reach a command line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pty
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from app import control
from app.cli import main
from app.config import load_settings
from app.jobsfile import parse_line
from app.launch import session_name
from app.models import JobSpec, JobState, LineError
from app.paths import StatePaths
from app.requirements import LlmConfigCache
from app.runners import TmuxRunner
from app.runners.screen import ScreenRunner
from app.service import serve, setup_logging
from app.settings import Settings, SettingsError
from app.store import Store
from app.trust import Gate, GuardedLlmConfig, UntrustedPathError
from tests.helpers import wait_until
from tests.workspace import Workspace, make_workspace, serving

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
needs_screen = pytest.mark.skipif(shutil.which("screen") is None, reason="screen not installed")

#: A job that leaves a file of its own in its folder (the workspace) and prints a line.
OWN_FILE_JOB = """\
import sys
with open(sys.argv[1], "w") as f:
    f.write("made by the job\\n")
print("job output line", flush=True)
"""


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.fixture
def screendir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private, short SCREENDIR, as `make_runner` reads it; its sessions quit afterwards."""
    path = tempfile.mkdtemp(prefix="gs-", dir="/tmp")
    monkeypatch.setenv("SCREENDIR", path)
    try:
        yield path
    finally:
        runner = ScreenRunner(path)
        for name in runner.sessions():
            runner.kill(name, grace_s=1.0)
        shutil.rmtree(path, ignore_errors=True)


# ---- 1. strict modes at start ---------------------------------------------------------------


def workspace_settings(tmp_path: Path) -> Settings:
    ws = make_workspace(tmp_path / "ws", "unused", gpus=1)
    ws.store.close()
    return ws.settings


@pytest.mark.parametrize(
    ("target", "what"),
    [
        ("jobs.txt", "jobs file"),
        ("llm_config.json", "llm config file"),
        (".", "jobs file"),  # the folder of the jobs file (and of everything else)
    ],
)
def test_start_refuses_an_input_others_can_change(tmp_path: Path, target: str, what: str) -> None:
    settings = workspace_settings(tmp_path)
    path = tmp_path / "ws" / target
    path.chmod(0o777 if path.is_dir() else 0o666)
    with pytest.raises(UntrustedPathError) as caught:
        serve(settings)
    message = str(caught.value)
    assert message.startswith(f"refusing to read {what} ")
    assert "is writable by every user" in message and "--no-strict-modes" in message
    assert caught.value.exit_code == 2
    paths = StatePaths(tmp_path / "ws" / "state")
    assert control.scheduler_pid(paths) is None  # nothing was started


def test_start_refuses_commands_spool_state_and_log_folders_others_can_change(
    tmp_path: Path,
) -> None:
    settings = workspace_settings(tmp_path)
    shared = tmp_path / "shared"
    (shared / "spool").mkdir(parents=True)
    (shared / "commands.txt").write_text("echo hi\n")
    shared.chmod(0o777)
    settings = replace(
        settings,
        commands_file=shared / "commands.txt",
        spool_dir=shared / "spool",
        log_dir=shared / "logs",
        state_dir=shared / "state",
    )
    with pytest.raises(UntrustedPathError) as caught:
        serve(settings)
    lines = str(caught.value).splitlines()
    for what in ("commands file", "spool folder", "state directory", "log directory"):
        assert any(line.startswith(f"refusing to read {what} {shared}/") for line in lines), what
    assert all(f"directory {shared} (" in line for line in lines[-4:])
    assert len(lines) == 4  # the jobs file and llm_config.json are fine


def test_start_refuses_a_spool_inbox_others_can_drop_scripts_in(tmp_path: Path) -> None:
    settings = workspace_settings(tmp_path)
    spool = tmp_path / "spool"
    (spool / "1.to_run").mkdir(parents=True)
    (spool / "1.to_run").chmod(0o1777)  # sticky or not: whatever lands there runs
    with pytest.raises(UntrustedPathError) as caught:
        serve(replace(settings, spool_dir=spool))
    assert str(caught.value).startswith(f"refusing to read spool folder {spool}/1.to_run: it (")


def start_argv(settings: Settings, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "app", "start", "--jobs-file", str(settings.jobs_file),
        "--llm-config", str(settings.llm_config), "--state-dir", str(settings.state_dir),
        "--gpu-backend", "fake", "--fake-gpus", str(settings.fake_gpus), *flags,
    ]  # fmt: skip


def _starts(paths: StatePaths) -> int:
    """How many times a scheduler logged its start on this state directory (after its
    signal handlers are in place)."""
    log = paths.scheduler_log
    return log.read_text().count("gpusched started") if log.exists() else 0


def test_gpusched_start_refuses_and_the_override_starts_it(tmp_path: Path) -> None:
    settings = workspace_settings(tmp_path)
    settings.jobs_file.chmod(0o666)
    paths = StatePaths(tmp_path / "ws" / "state")
    refused = subprocess.run(
        start_argv(settings), check=False, capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert f"gpusched: error: refusing to read jobs file {settings.jobs_file}" in refused.stderr
    assert "mode 0666" in refused.stderr and "--no-strict-modes" in refused.stderr
    assert "Traceback" not in refused.stderr
    for argv, env in (
        (start_argv(settings, "--no-strict-modes"), os.environ),
        (start_argv(settings), {**os.environ, "GPUSCHED_STRICT_MODES": "0"}),
    ):
        starts = _starts(paths)
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            # Up and past its start-up (signal handlers in place) once it has logged this.
            wait_until(
                lambda p=proc, n=starts: p.poll() is not None or _starts(paths) > n,
                timeout=30,
            )
            started = proc.poll() is None
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            out = proc.communicate(timeout=30)[0].decode()
        assert started, out
        assert "strict modes are off" in out


def test_a_config_file_others_can_change_is_refused_and_cannot_vouch_for_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    config = work / "gpusched.toml"
    config.write_text("strict_modes = false\nmax_workers = 3\n")
    config.chmod(0o666)
    monkeypatch.chdir(work)
    monkeypatch.delenv("GPUSCHED_STRICT_MODES", raising=False)
    assert main(["config"]) == 2  # a refusal, as `start`'s
    err = capsys.readouterr().err
    assert f"gpusched: error: refusing to read config file {config}: it (owner" in err
    # Other commands read the default config file for the state directory: refused too.
    with pytest.raises(UntrustedPathError):
        load_settings(os.environ, {})
    # Only the command line or the environment can turn the check off.
    assert main(["config", "--json", "--no-strict-modes"]) == 0
    got = json.loads(capsys.readouterr().out)["settings"]
    assert got["strict_modes"] == {"value": False, "source": "flag --no-strict-modes"}
    assert got["max_workers"]["value"] == 3
    monkeypatch.setenv("GPUSCHED_STRICT_MODES", "0")
    assert load_settings(os.environ, {}).settings.max_workers == 3
    monkeypatch.delenv("GPUSCHED_STRICT_MODES")
    config.chmod(0o644)
    effective = load_settings(os.environ, {})
    assert effective.settings.strict_modes is False  # a trusted file may turn the rest off
    assert effective.sources["strict_modes"] == f"file {config}"


# ---- 2. strict modes while running ---------------------------------------------------------


@needs_tmux
def test_a_jobs_file_that_becomes_writable_is_not_read_until_fixed(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1, monitor_interval=1.0)
    with serving(ws) as store:
        ws.append(ws.job_line("--name first"))
        wait_until(lambda: store.job(1) is not None)
        ws.jobs_file.chmod(0o666)  # now anybody could add a line
        ws.append(ws.job_line("--name second"))

        def reported() -> list[LineError]:
            return [e for e in store.line_errors() if "not reading" in e.reason]

        (error,) = wait_until(reported)
        assert (error.file, error.line) == ("jobs.txt", 2)  # the first line not read
        assert error.reason.startswith(f"not reading jobs file {ws.jobs_file}: it (owner")
        assert "mode 0666" in error.reason and "--no-strict-modes" in error.reason
        assert [j.id for j in store.jobs()] == [1]
        ws.jobs_file.chmod(0o644)  # fixed: the waiting line is read at the next pass
        wait_until(lambda: store.job(2) is not None and store.job(2).status == JobState.COMPLETED)
        assert len(reported()) == 1  # reported once, however many passes refused it
    log = ws.paths.scheduler_log.read_text()
    assert log.count("not reading jobs file") == 1
    assert "passes the ownership and mode checks again; reading it" in log


def test_llm_config_that_becomes_writable_keeps_the_last_good_configuration(
    tmp_path: Path,
) -> None:
    path = tmp_path / "llm_config.json"
    path.write_text(json.dumps({"models": {"m": 0.5}}))
    gate = Gate()
    gate.stops = frozenset({str(tmp_path)})
    cache = GuardedLlmConfig(path, gate)
    assert cache.get().requirement("--llm m").amount == 0.5
    path.chmod(0o666)
    path.write_text(json.dumps({"models": {"m": 2}}))  # written by someone else, maybe
    assert cache.get().requirement("--llm m").amount == 0.5
    assert cache.error is not None
    assert cache.error.startswith(f"not reading llm config file {path}: it (owner")
    path.chmod(0o644)  # its owner vouches for it again
    assert cache.get().requirement("--llm m").amount == 2.0
    assert cache.error is None
    assert cache.generation == 2
    assert isinstance(cache, LlmConfigCache)


# ---- 3. modes of what gpusched creates --------------------------------------------------


@pytest.mark.parametrize(
    "runner",
    [
        pytest.param("tmux", marks=needs_tmux),
        pytest.param("screen", marks=needs_screen),
        "direct",
    ],
)
def test_everything_under_the_state_directory_is_private_whatever_the_umask(
    tmp_path: Path, tmux_socket: str, runner: str, request: pytest.FixtureRequest
) -> None:
    """Under umask 000 (the loosest) every mode checked here must come from gpusched. The
    servers (tmux, screen) and the jobs start under it too: the job's own file shows that
    jobs keep the user's umask."""
    if runner == "screen":
        request.getfixturevalue("screendir")
    with umask(0):
        ws = make_workspace(tmp_path, tmux_socket, gpus=1, runner=runner)
        (ws.root / "own.py").write_text(OWN_FILE_JOB)
        for path in ws.root.iterdir():  # the user's own inputs: not writable by others
            if path.is_file():
                path.chmod(0o644)
        with serving(ws) as store:
            ws.append(f"0,{ws.root / 'own.py'},,made.txt,")
            wait_until(lambda: (j := store.job(1)) is not None and j.status == JobState.COMPLETED)
            job = store.job(1)
    assert job is not None and job.log_path is not None
    log_path = Path(job.log_path)
    wait_until(lambda: "job output line" in log_path.read_text(errors="replace"))
    state = ws.paths.root
    made = sorted(state.rglob("*"))
    names = {p.relative_to(state).as_posix() for p in made}
    assert {"gpusched.db", "gpusched.log", "scheduler.lock", "wakeup", "logs", "exits"} <= names
    assert f"logs/{log_path.name}" in names
    loose = {p.relative_to(state).as_posix(): oct(p.lstat().st_mode) for p in made}
    assert {name: mode for name, mode in loose.items() if int(mode, 8) & 0o077} == {}
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((ws.root / "made.txt").stat().st_mode) == 0o666  # the job's umask


def test_an_older_state_directory_is_made_private(tmp_path: Path) -> None:
    paths = StatePaths(tmp_path / "state")
    for d in (paths.root, paths.logs, paths.exits, paths.run):
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o755)
    for f in (paths.db, paths.scheduler_log, paths.lock, paths.logs / "job_1_x.log"):
        f.write_text("")
        f.chmod(0o644)
    paths.db.unlink()
    Store(paths.db).close()  # creates a database under a directory it does not own
    paths.db.chmod(0o644)
    Path(f"{paths.db}-wal").write_text("")
    Path(f"{paths.db}-wal").chmod(0o644)
    paths.ensure()
    store = Store(paths.db)
    store.set_meta({"x": "y"})
    for path in (paths.db, Path(f"{paths.db}-wal"), Path(f"{paths.db}-shm")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    setup_logging(paths, stream=False)
    for handler in logging.getLogger("gpusched").handlers:
        handler.close()
    logging.getLogger("gpusched").handlers.clear()
    lock = control.SchedulerLock(paths)
    lock.acquire()
    lock.release()
    store.close()
    for path in (paths.root, paths.logs, paths.exits, paths.run):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for path in (paths.db, paths.scheduler_log, paths.lock):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    # A job log from before is left as it is: only what gpusched opens again is changed.
    assert stat.S_IMODE((paths.logs / "job_1_x.log").stat().st_mode) == 0o644


# ---- 4. tmux sockets and session names ---------------------------------------------------


@pytest.mark.parametrize(
    "name", ["../elsewhere", "a/b", "/tmp/sock", "-x", ".hidden", "a b", "x;y", "é", "x" * 101]
)
def test_a_tmux_socket_is_a_plain_name(name: str, tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="tmux_socket must be a socket name"):
        Settings(tmux_socket=name).validate()
    with pytest.raises(SettingsError, match="env GPUSCHED_TMUX_SOCKET: tmux_socket must be"):
        load_settings({"GPUSCHED_TMUX_SOCKET": name}, {}, cwd=tmp_path)
    with pytest.raises(control.ActionError, match="bad tmux socket name"):
        control.runner_for(f"tmux:{name}")


def test_valid_tmux_socket_names() -> None:
    for name in ("gpusched", "gpusched_test_0a1b", "team-a.gpu_1"):
        assert Settings(tmux_socket=name).validate().tmux_socket == name


@needs_tmux
def test_the_tmux_socket_lives_in_tmux_s_private_directory(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    ws.append(ws.job_line("--sleep 0"))
    ws.tick()
    wait_until(ws.paths.exit_file(1).exists)
    tmpdir = Path(os.environ.get("TMUX_TMPDIR", "/tmp"), f"tmux-{os.getuid()}")
    socket = tmpdir / tmux_socket
    assert stat.S_ISSOCK(socket.stat().st_mode)
    st = tmpdir.stat()
    assert st.st_uid == os.getuid() and stat.S_IMODE(st.st_mode) == 0o700
    ws.store.close()


NASTY_SCRIPTS = [
    "train.py",
    "a;kill-server.py",
    "a:b.c.py",
    "-t x.py",
    "%1.py",
    "$1.py",
    "=x.py",
    "@1.py",
    "{marked}.py",
    "line\nbreak.py",
    "é中文🚀.py",
    "#{session_name}.py",
    "x" * 300 + ".py",
]


@pytest.mark.parametrize("script", NASTY_SCRIPTS)
def test_session_names_are_plain_and_never_a_prefix_of_another_job_s(script: str) -> None:
    for job_id in (1, 10, 12345):
        name = session_name(job_id, [0, 1], f"/work/{script}")
        # No `:` `.` (window/pane), `=` `$` `%` `@` `{` (target syntax), `;` `#`, blanks.
        assert re.fullmatch(rf"gpujob_{job_id}_0-1_[A-Za-z0-9_-]{{1,40}}", name), name
    names = [session_name(i, [0], f"/w/{script}") for i in range(1, 200)]
    for a in names:
        for b in names:
            assert a == b or not b.startswith(a)


def attached_to(argv: list[str], socket: str) -> str | None:
    """Run `argv` (a tmux attach) in a real terminal: the session it attached to (then
    detached again), or None when it exited without attaching."""
    env = {k: v for k, v in os.environ.items() if k != "TMUX"} | {"TERM": "xterm"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: the attach command in the new terminal
        try:
            os.execvpe(argv[0], argv, env)
        finally:
            os._exit(127)
    tmux = ["tmux", "-L", socket]
    try:

        def client() -> list[str] | bool:
            out = subprocess.run(
                [*tmux, "list-clients", "-F", "#{client_session}"],
                check=False,
                capture_output=True,
                text=True,
            ).stdout.split()
            return out or os.waitpid(pid, os.WNOHANG)[0] == pid

        found = wait_until(client)
        if isinstance(found, list):
            subprocess.run([*tmux, "detach-client", "-s", f"={found[0]}"], check=True)
            os.waitpid(pid, 0)
            return found[0]
        return None
    finally:
        with contextlib.suppress(OSError):
            os.read(fd, 65536)
        os.close(fd)


@needs_tmux
def test_sessions_are_addressed_exactly(tmux_socket: str) -> None:
    """A job's session name that is a prefix of another session (a user's, or a job's of an
    earlier scheduler) never reaches that other session: tmux's `-t NAME` falls back to a
    prefix match when NAME itself is missing; gpusched always says `-t =NAME`."""
    runner = TmuxRunner(tmux_socket)
    other = "gpujob_1_0_trainer"
    tmux = ["tmux", "-L", tmux_socket]
    subprocess.run([*tmux, "new-session", "-d", "-s", other, "sleep", "600"], check=True)
    gone = "gpujob_1_0_train"  # this job's session has ended
    plain = subprocess.run([*tmux, "has-session", "-t", gone], check=False, capture_output=True)
    assert plain.returncode == 0  # what a plain `-t` would have addressed
    assert not runner.has_session(gone)
    assert runner.pane_tail(gone) == []
    runner.kill(gone)
    runner.remove(gone)
    assert runner.has_session(other)
    assert list(runner.sessions()) == [other]
    # `gpusched attach` of the ended job does not attach to the other session...
    assert runner.attach_argv(gone)[-2:] == ["-t", f"={gone}"]
    assert attached_to(runner.attach_argv(gone), tmux_socket) is None
    # ...while the exact name attaches (tmux accepts `=NAME` wherever a session is meant).
    assert attached_to(runner.attach_argv(other), tmux_socket) == other
    runner.remove(other)
    assert runner.sessions() == {}


# ---- 5. conda environments and GPU ids, checked when a line is read ----------------------


@pytest.fixture
def script(tmp_path: Path) -> Path:
    path = tmp_path / "t.py"
    path.write_text("print(1)\n")
    return path


def parse(text: str, base: Path) -> JobSpec | LineError | None:
    return parse_line(text, file="jobs.txt", line=7, base_dir=base, gpu_count=8)


@pytest.mark.parametrize(
    ("env", "why"),
    [
        ("my env", "has ' '"),
        ("x;rm -rf ~", "has ';'"),
        ("$(id)", "has '$'"),
        ("`id`", "has '`'"),
        ("a|b", "has '|'"),
        ("'q'", 'has "\'"'),
        ("-n", "cannot start with '-'"),
        ("--help", "cannot start with '-'"),
        ("..", "is not an environment name"),
        ("é", "has 'é'"),
        ("/opt/envs/$USER", "has '$'"),
        ("/opt/my envs/x", "has ' '"),
        ("/opt/envs:/x", "has ':'"),
    ],
)
def test_bad_conda_envs_are_line_errors(script: Path, env: str, why: str) -> None:
    result = parse(f'0,{script},"{env}",--x 1,', script.parent)
    assert isinstance(result, LineError), result
    assert str(result).startswith(f"jobs.txt:7: conda_env {env!r} {why}")


@pytest.mark.parametrize(
    "env", ["", "pytorch_env", "py3.11", "torch+cu121", "base", "/opt/conda/envs/t-1", "~/envs/x"]
)
def test_good_conda_envs_pass(script: Path, env: str) -> None:
    result = parse(f"0,{script},{env},--x 1,", script.parent)
    assert isinstance(result, JobSpec) and result.conda_env == env


@pytest.mark.parametrize(
    "gpus", ["-1", "٣", "１", "+1", "1_0", "0x1", "1.0", "1e3", "4096", "0-4096", "2-1", "a", "0;1"]
)
def test_bad_gpu_ids_are_line_errors(script: Path, gpus: str) -> None:
    result = parse(f"0,{script},,--x 1,{gpus}", script.parent)
    assert isinstance(result, LineError), result
    assert "allowed_gpus" in result.reason


def test_gpu_ids_beyond_the_machine_are_line_errors(script: Path) -> None:
    result = parse(f"0,{script},,--x 1,7-8", script.parent)
    assert isinstance(result, LineError)
    assert result.reason == "unknown GPU 8 in allowed_gpus (this machine has GPUs 0-7)"


def test_a_bad_conda_env_is_reported_in_status_and_never_launched(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ws: Workspace = make_workspace(tmp_path, "unused", gpus=1, runner="direct")
    ws.append(f"0,{ws.script},x;touch pwned,--x 1,", ws.job_line("--sleep 0"))
    ws.tick()
    errors = [str(e) for e in ws.store.line_errors()]
    assert errors == [
        "jobs.txt:1: conda_env 'x;touch pwned' has ';', which is not allowed "
        "(in an environment name: ASCII letters, digits and _ . + -)"
    ]
    assert [j.conda_env for j in ws.store.jobs()] == [""]
    ws.daemon.runner.close(grace_s=1.0)  # type: ignore[attr-defined]
    ws.store.close()
    capsys.readouterr()  # the direct job's echo
    assert main(["status", "--json", "--state-dir", str(ws.paths.root)]) == 0
    assert errors[0] in json.loads(capsys.readouterr().out)["errors"]
    assert not list(tmp_path.rglob("pwned"))
