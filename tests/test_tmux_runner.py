"""TmuxRunner, wrapper and proctree against a real tmux server on a private socket."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from app import proctree
from app.launch import LaunchRequest, build_launch
from app.paths import StatePaths
from app.runners import LaunchError, TmuxRunner
from tests.helpers import wait_until

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")

_job_ids = iter(range(100, 10_000))


def make_job(
    paths: StatePaths,
    tmp_path: Path,
    body: str,
    *,
    args: str = "",
    conda_env: str = "",
    env: dict[str, str] | None = None,
    suffix: str = ".py",
    rewrite: bool = True,
) -> LaunchRequest:
    """Write `body` as a script under tmp_path and build its launch on GPU 0."""
    job_id = next(_job_ids)
    script = tmp_path / f"job{job_id}{suffix}"
    script.write_text(body)
    base_env = dict(os.environ) if env is None else env
    return build_launch(
        job_id=job_id,
        script=str(script),
        conda_env=conda_env,
        args=args,
        gpus=[0],
        paths=paths,
        base_env=base_env,
        now=time.time(),
        rewrite=rewrite,
    )


def exit_record(req: LaunchRequest) -> dict[str, Any]:
    wait_until(req.exit_file.exists)
    record: dict[str, Any] = json.loads(req.exit_file.read_text())
    return record


def log_has(req: LaunchRequest, text: str) -> bool:
    return req.log_path.exists() and text in req.log_path.read_text(errors="replace")


def gone(pid: int) -> bool:
    info = proctree.read_proc(pid)
    return info is None or info.state in ("Z", "X")


DUMP = """\
import json, os, sys
out = sys.argv[1]
with open(out + ".tmp", "w") as f:
    json.dump({"argv": sys.argv[2:], "env": dict(os.environ)}, f)
os.replace(out + ".tmp", out)
for a in sys.argv[2:]:
    print("ARG:" + a)
"""

SLEEPER = """\
import sys, time
print("READY", flush=True)
time.sleep(1000)
"""


@pytest.fixture
def runner(tmux_socket: str) -> TmuxRunner:
    return TmuxRunner(socket_name=tmux_socket)


def test_arguments_reach_the_script_literally(
    runner: TmuxRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    marker = Path(f"/tmp/should_not_exist_{uuid.uuid4().hex}")
    out = tmp_path / "dump.json"
    req = make_job(
        state_paths,
        tmp_path,
        DUMP,
        args=f"{out} --x ';echo pwned' '$(touch {marker})' \"a b\"",
    )
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    expected = ["--x", ";echo pwned", f"$(touch {marker})", "a b", "--cuda", "0"]
    assert json.loads(out.read_text())["argv"] == expected
    wait_until(lambda: log_has(req, "ARG:a b"))
    log = req.log_path.read_text()
    assert "ARG:;echo pwned" in log
    assert f"ARG:$(touch {marker})" in log
    assert "\npwned" not in log
    assert not marker.exists()


def test_exit_code_recorded_and_dead_pane_kept(
    runner: TmuxRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    req = make_job(state_paths, tmp_path, "import sys\nsys.exit(3)\n")
    launched = runner.launch(req)
    assert launched.session == req.session
    record = exit_record(req)
    assert record["exit_code"] == 3
    assert record["job_id"] == req.job_id
    assert isinstance(record["pid"], int)
    assert record["started_at"] <= record["ended_at"]
    # remain-on-exit keeps the pane and its status as a fallback for a lost record.
    # (The status may lag a moment behind pane_dead: tmux collects it asynchronously.)
    wait_until(lambda: runner.sessions()[req.session].dead_status is not None)
    state = runner.sessions()[req.session]
    assert not state.alive
    assert state.dead_status == 3
    runner.remove(req.session)
    assert req.session not in runner.sessions()
    runner.remove(req.session)  # already gone: no error
    assert not list(state_paths.exits.glob(".*.tmp"))


def test_first_output_reaches_the_log(
    runner: TmuxRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    req = make_job(state_paths, tmp_path, "print('FIRST-LINE-7f3a')\n")
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    wait_until(lambda: log_has(req, "FIRST-LINE-7f3a"))
    assert any("FIRST-LINE-7f3a" in line for line in runner.pane_tail(req.session))


def test_job_env_comes_from_spec_not_from_running_server(
    runner: TmuxRunner, tmux_socket: str, state_paths: StatePaths, tmp_path: Path
) -> None:
    # A server started earlier, with an environment the job must not see.
    server_env = {k: v for k, v in os.environ.items() if k != "MY_JOB_VAR"}
    server_env["SERVER_ONLY_VAR"] = "1"
    subprocess.run(
        ["tmux", "-L", tmux_socket, "new-session", "-d", "-s", "user_session"],
        env=server_env,
        check=True,
    )
    out = tmp_path / "dump.json"
    env = {k: v for k, v in os.environ.items() if k != "SERVER_ONLY_VAR"}
    env["MY_JOB_VAR"] = "hello world"
    env["CUDA_VISIBLE_DEVICES"] = "5"
    req = make_job(state_paths, tmp_path, DUMP, args=str(out), env=env)
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    job_env = json.loads(out.read_text())["env"]
    assert job_env["MY_JOB_VAR"] == "hello world"
    assert job_env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert job_env["GPUSCHED_JOB_ID"] == str(req.job_id)
    assert job_env["GPUSCHED_GPUS"] == "0"
    assert "CUDA_VISIBLE_DEVICES" not in job_env
    assert "SERVER_ONLY_VAR" not in job_env
    # The pane's own terminal variables are kept.
    assert tmux_socket in job_env["TMUX"]
    assert job_env["TMUX_PANE"].startswith("%")
    assert job_env["TERM"]
    # Only the scheduler's sessions are reported.
    assert set(runner.sessions()) == {req.session}


def test_spec_file_is_private(runner: TmuxRunner, state_paths: StatePaths, tmp_path: Path) -> None:
    req = make_job(state_paths, tmp_path, "pass\n")
    runner.launch(req)
    assert stat.S_IMODE(req.spec_file.stat().st_mode) == 0o600
    assert json.loads(req.spec_file.read_text())["exit_file"] == str(req.exit_file)
    exit_record(req)


def test_running_session_reports_pid_and_rejects_duplicate(
    runner: TmuxRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    req = make_job(state_paths, tmp_path, SLEEPER)
    launched = runner.launch(req)
    wait_until(lambda: log_has(req, "READY"))
    state = runner.sessions()[req.session]
    assert state.alive
    assert state.pid == launched.pid
    assert state.pid is not None
    assert "wrapper.py" in Path(f"/proc/{state.pid}/cmdline").read_text()
    with pytest.raises(LaunchError, match="already exists"):
        runner.launch(req)
    runner.kill(req.session)
    assert req.session not in runner.sessions()
    # The wrapper forwarded SIGTERM and still recorded how the job ended.
    assert exit_record(req)["exit_code"] == 143


def test_kill_reaches_setsid_grandchild(
    runner: TmuxRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    pid_file = tmp_path / "grandchild.pid"
    body = f"""\
import os, subprocess, time
p = subprocess.Popen(["setsid", "sleep", "1000"])
with open({str(pid_file)!r} + ".tmp", "w") as f:
    f.write(str(p.pid))
os.replace({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
time.sleep(1000)
"""
    req = make_job(state_paths, tmp_path, body)
    launched = runner.launch(req)
    wait_until(pid_file.exists)
    grandchild = int(pid_file.read_text())
    assert launched.pid is not None
    assert grandchild in proctree.descendants(launched.pid)
    # Wait for `setsid` to have left the pane's session (then it execs sleep).
    wait_until(lambda: (i := proctree.read_proc(grandchild)) is not None and i.sid == grandchild)
    runner.kill(req.session)
    wait_until(lambda: gone(grandchild))
    assert gone(launched.pid)
    assert req.session not in runner.sessions()
    runner.kill(req.session)  # already gone: no error


def test_kill_tree_reaches_orphans_in_the_session(tmp_path: Path) -> None:
    pid_file = tmp_path / "orphan.pid"
    # The subshell exits at once: its `sleep` is orphaned (reparented away from the tree)
    # but stays in the session the root leads, as in a tmux pane.
    script = f"(sleep 1000 & echo $! > {pid_file}.tmp; mv {pid_file}.tmp {pid_file}); sleep 1000"
    root = subprocess.Popen(["sh", "-c", script], start_new_session=True)
    try:
        wait_until(pid_file.exists)
        orphan = int(pid_file.read_text())
        wait_until(lambda: (i := proctree.read_proc(orphan)) is not None and i.ppid != root.pid)
        assert orphan not in proctree.descendants(root.pid)
        proctree.kill_tree(root.pid, grace_s=5.0)
        assert root.wait(timeout=10) != 0
        wait_until(lambda: gone(orphan))
    finally:
        if root.poll() is None:
            root.kill()
            root.wait()


def test_ctrl_c_reaches_the_job(
    runner: TmuxRunner, tmux_socket: str, state_paths: StatePaths, tmp_path: Path
) -> None:
    req = make_job(state_paths, tmp_path, SLEEPER)
    runner.launch(req)
    wait_until(lambda: log_has(req, "READY"))
    subprocess.run(
        ["tmux", "-L", tmux_socket, "send-keys", "-t", f"={req.session}:", "C-c"], check=True
    )
    code = exit_record(req)["exit_code"]
    assert code != 0
    assert code in (130, 1)  # killed by SIGINT, or KeyboardInterrupt handled by Python
    wait_until(lambda: runner.sessions()[req.session].dead_status is not None)
    assert runner.sessions()[req.session].dead_status == code


def test_a_job_killed_from_outside_by_sigkill_is_recorded_137(
    runner: TmuxRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    """The kernel's OOM killer, or a user's `kill -9 PID`: the job's own process dies, not
    the wrapper, which records 128 + 9 like a shell would."""
    req = make_job(state_paths, tmp_path, SLEEPER)
    launched = runner.launch(req)
    wait_until(lambda: log_has(req, "READY"))
    assert launched.pid is not None
    (job,) = [
        p for p in proctree.descendants(launched.pid)
        if str(tmp_path) in Path(f"/proc/{p}/cmdline").read_text()
    ]  # fmt: skip
    os.kill(job, 9)
    assert exit_record(req)["exit_code"] == 137
    wait_until(lambda: runner.sessions()[req.session].dead_status == 137)


def _fake_conda(tmp_path: Path) -> Path:
    bindir = tmp_path / "fakebin"
    bindir.mkdir()
    conda = bindir / "conda"
    conda.write_text(
        "#!/bin/bash\n"
        'if [ "$1" = shell.bash ] && [ "$2" = hook ]; then\n'
        "  cat <<'EOF'\n"
        'conda() { if [ "$1" = activate ]; then export FAKE_CONDA_ENV="$2"; fi; }\n'
        "EOF\n"
        "fi\n"
    )
    conda.chmod(0o755)
    return bindir


def test_conda_environment_is_activated(
    runner: TmuxRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CONDA_EXE"}
    env["PATH"] = f"{_fake_conda(tmp_path)}:{env['PATH']}"
    out = tmp_path / "dump.json"
    req = make_job(state_paths, tmp_path, DUMP, args=f"{out} ';x'", conda_env="myenv", env=env)
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 0
    dumped = json.loads(out.read_text())
    assert dumped["env"]["FAKE_CONDA_ENV"] == "myenv"
    assert dumped["argv"] == [";x", "--cuda", "0"]


def test_conda_missing_exits_127(
    runner: TmuxRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    path = "/usr/bin:/bin"
    if shutil.which("conda", path=path):
        pytest.skip("a real conda is installed in /usr/bin or /bin")
    env = {k: v for k, v in os.environ.items() if k != "CONDA_EXE"}
    env["PATH"] = path
    req = make_job(state_paths, tmp_path, "print('never')\n", conda_env="myenv", env=env)
    runner.launch(req)
    assert exit_record(req)["exit_code"] == 127
    message = "gpusched: conda not found on PATH; cannot activate environment 'myenv'"
    wait_until(lambda: log_has(req, message))
    assert not log_has(req, "never")


def test_missing_or_non_executable_command(
    runner: TmuxRunner, state_paths: StatePaths, tmp_path: Path
) -> None:
    missing = make_job(state_paths, tmp_path, "", suffix=".bin")
    Path(missing.argv[0]).unlink()
    runner.launch(missing)
    assert exit_record(missing)["exit_code"] == 127
    wait_until(lambda: log_has(missing, "gpusched: cannot run"))

    not_exec = make_job(state_paths, tmp_path, "#!/bin/sh\n", suffix=".bin")
    runner.launch(not_exec)
    assert exit_record(not_exec)["exit_code"] == 126
    wait_until(lambda: log_has(not_exec, "Permission denied"))


def test_no_server_means_no_sessions(runner: TmuxRunner) -> None:
    assert runner.sessions() == {}
    assert runner.pane_tail("gpujob_1_0_x") == []
    runner.remove("gpujob_1_0_x")
    runner.kill("gpujob_1_0_x")


def test_attach_argv(tmux_socket: str, monkeypatch: pytest.MonkeyPatch) -> None:
    private = TmuxRunner(socket_name=tmux_socket)
    default = TmuxRunner()
    monkeypatch.delenv("TMUX", raising=False)
    assert default.attach_argv("gpujob_1_0_x") == ["tmux", "attach", "-t", "=gpujob_1_0_x"]
    assert private.attach_argv("s") == ["tmux", "-L", tmux_socket, "attach", "-t", "=s"]
    monkeypatch.setenv("TMUX", "/tmp/tmux-1000/default,123,0")
    assert default.attach_argv("s") == ["tmux", "switch-client", "-t", "=s"]
    nested = ["env", "-u", "TMUX", "tmux", "-L", tmux_socket, "attach", "-t", "=s"]
    assert private.attach_argv("s") == nested
    monkeypatch.setenv("TMUX", f"/tmp/tmux-1000/{tmux_socket},123,0")
    assert private.attach_argv("s") == ["tmux", "-L", tmux_socket, "switch-client", "-t", "=s"]


def test_wrapper_is_standalone(tmp_path: Path) -> None:
    wrapper = Path(__file__).resolve().parent.parent / "app" / "wrapper.py"
    text = wrapper.read_text()
    assert "from app" not in text
    assert "import app" not in text
    # Runs with the stdlib alone: isolated mode, outside the repository.
    res = subprocess.run(
        [sys.executable, "-I", str(wrapper)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
    )
    assert res.returncode == 2
    assert "usage" in res.stderr
