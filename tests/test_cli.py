"""The `gpusched` commands, called in-process (`main(argv)`) against a real scheduler."""

from __future__ import annotations

import json
import shlex
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from app.cli import main
from app.jobsfile import parse_line
from app.models import JobSpec
from app.paths import StatePaths
from app.service import serve
from app.settings import Settings
from app.store import Store
from tests.helpers import wait_until
from tests.workspace import make_workspace


@dataclass
class Running:
    root: Path
    state: str
    stop: threading.Event
    thread: threading.Thread

    def run(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
        code = main([*argv, "--state-dir", self.state])
        out, err = capsys.readouterr()
        return code, out, err

    def status(self, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
        code, out, _ = self.run(capsys, "status", "--json")
        assert code == 0
        data: dict[str, Any] = json.loads(out)
        return data

    def job(self, capsys: pytest.CaptureFixture[str], job_id: int) -> dict[str, Any]:
        """The job's status entry, {} while it is not in the database yet."""
        return next((j for j in self.status(capsys)["jobs"] if j["id"] == job_id), {})


@pytest.fixture
def running(tmp_path: Path, tmux_socket: str) -> Iterator[Running]:
    ws = make_workspace(tmp_path, tmux_socket, gpus=2)
    ws.store.close()
    settings: Settings = ws.settings
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(settings, stop, False), daemon=True)
    thread.start()
    state = str(ws.paths.root)
    wait_until(lambda: ws.paths.lock.exists() and ws.paths.lock.read_text().strip())
    yield Running(tmp_path, state, stop, thread)
    stop.set()
    thread.join(timeout=10)


def test_add_args_with_dashes_as_written(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "script.py"
    script.write_text("")
    out = tmp_path / "jobs.txt"
    argv = ["add", str(script), "--conda", "myenv", "--args", "--llm qwen2.5-7b-inst --mode train"]
    assert main([*argv, "--output-file", str(out), "--priority", "2", "--gpus", "0,1,2,3"]) == 0
    assert (
        main(["add", str(script), "--args", "--tags a,b --q 'x y'", "--output-file", str(out)]) == 0
    )
    lines = out.read_text().splitlines()
    first = parse_line(lines[0], file="jobs.txt", line=1, base_dir=tmp_path, gpu_count=None)
    assert first == JobSpec(2, str(script), "myenv", "--llm qwen2.5-7b-inst --mode train",
                            (0, 1, 2, 3), "jobs.txt:1")  # fmt: skip
    second = parse_line(lines[1], file="jobs.txt", line=2, base_dir=tmp_path, gpu_count=None)
    assert isinstance(second, JobSpec)
    assert second.args == "--tags a,b --q 'x y'"
    assert "added to" in capsys.readouterr().out


def test_add_takes_the_words_after_a_double_dash_as_arguments(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "script.py"
    script.write_text("")
    out = tmp_path / "jobs.txt"
    words = ["--lr", "0.1", "--name", "two words", "--q=[a;b]"]
    assert main(["add", str(script), "--output-file", str(out), "--", *words]) == 0
    (line,) = out.read_text().splitlines()
    spec = parse_line(line, file="jobs.txt", line=1, base_dir=tmp_path, gpu_count=None)
    assert isinstance(spec, JobSpec) and shlex.split(spec.args) == words
    with pytest.raises(SystemExit):  # both ways at once: refused, nothing written
        main(["add", str(script), "--args", "--x 1", "--output-file", str(out), "--", "--y"])
    assert "unrecognized arguments: --args-twice" in capsys.readouterr().err
    assert out.read_text().splitlines() == [line]


def test_add_refuses_a_bad_conda_env_and_a_line_break_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    script = tmp_path / "script.py"
    script.write_text("")
    out = tmp_path / "jobs.txt"
    assert main(["add", str(script), "--conda", "x;y", "--output-file", str(out)]) == 1
    assert "--conda:" in capsys.readouterr().err
    assert main(["add", str(script), "--output-file", str(out), "--", "a\nb"]) == 1
    assert "line break" in capsys.readouterr().err
    assert not out.exists()


def test_add_without_a_running_scheduler_uses_the_last_ones_jobs_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    script = tmp_path / "script.py"
    script.write_text("")
    state = StatePaths(tmp_path / "state").ensure()
    store = Store(state.db)
    store.set_meta({"jobs_file": str(tmp_path / "their-jobs.txt")})
    store.close()
    monkeypatch.chdir(tmp_path)  # a ./jobs.txt here must not be the one written
    assert main(["add", str(script), "--state-dir", str(state.root)]) == 0
    assert (tmp_path / "their-jobs.txt").read_text().count("script.py") == 1
    assert not (tmp_path / "jobs.txt").exists()


def test_add_rejects_missing_script_and_bad_gpus(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["add", str(tmp_path / "nope.py"), "--output-file", str(tmp_path / "j")]) == 1
    assert "not found" in capsys.readouterr().err
    (tmp_path / "s.py").write_text("")
    assert main(["add", str(tmp_path / "s.py"), "--gpus", "3-1"]) == 1
    assert "--gpus" in capsys.readouterr().err


def test_add_goes_to_the_running_schedulers_file_and_runs(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    script = running.root / "job.py"
    code, _, _ = running.run(capsys, "add", str(script), "--args", "--llm half --sleep 30")
    assert code == 0
    assert "--llm half --sleep 30" in (running.root / "jobs.txt").read_text()
    wait_until(lambda: running.job(capsys, 1).get("status") == "running")
    status = running.status(capsys)
    assert status["scheduler"]["running"] is True
    gpu0 = status["gpus"][0]
    assert set(gpu0) == {"index", "name", "paused", "allocated", "memory_used_mb",
                         "memory_total_mb", "utilization", "jobs"}  # fmt: skip
    assert gpu0["allocated"] == 0.5 and gpu0["jobs"] == [1]
    job = status["jobs"][0]
    assert set(job) == {"id", "status", "priority", "script", "conda_env", "args", "gpus",
                        "requirement", "session", "log", "exit_code", "reason", "source",
                        "submitted_at", "started_at", "ended_at"}  # fmt: skip
    assert job["source"] == "jobs.txt:1" and job["requirement"] == 0.5
    code, out, _ = running.run(capsys, "sessions")
    assert job["session"] in out and "attach -t" in out
    code, out, _ = running.run(capsys, "status")
    assert "[→] #1 python3 job.py --llm half --sleep 30  → GPU 0 → running (" in out


def test_add_waits_for_a_starting_scheduler_to_record_its_jobs_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The lock is held (pid written) a moment before the jobs file is recorded: `add` in that
    moment must not use the file of the scheduler that ran before (or ./jobs.txt)."""
    import os

    from app.control import SchedulerLock

    paths = StatePaths(tmp_path / "state").ensure()
    old, new = tmp_path / "old.txt", tmp_path / "new.txt"
    store = Store(paths.db)
    store.set_meta({"pid": "999999", "jobs_file": str(old)})  # the last scheduler's
    lock = SchedulerLock(paths)
    lock.acquire()  # this process is the scheduler that is starting
    recorder = threading.Timer(
        0.5, lambda: store.set_meta({"pid": str(os.getpid()), "jobs_file": str(new)})
    )
    recorder.start()
    script = tmp_path / "job.py"
    script.write_text("")
    try:
        assert main(["add", str(script), "--state-dir", str(paths.root)]) == 0
    finally:
        recorder.join()
        lock.release()
        store.close()
    assert f"added to {new}" in capsys.readouterr().out
    assert new.read_text().count("job.py") == 1 and not old.exists()


def test_pause_kill_retry_reach_the_scheduler(
    running: Running, capsys: pytest.CaptureFixture[str]
) -> None:
    assert running.run(capsys, "pause", "0")[0] == 0
    assert running.run(capsys, "pause", "1")[0] == 0
    code, _, err = running.run(capsys, "pause", "9")
    assert code == 1
    assert "GPU 9 is not one of the scheduler's GPUs (the scheduler manages GPU 0, 1)" in err
    with (running.root / "jobs.txt").open("a") as f:
        f.write(f"0,{running.root / 'job.py'},,--sleep 60,\n")
    wait_until(lambda: "paused" in running.job(capsys, 1).get("reason", ""))
    assert running.run(capsys, "resume", "1")[0] == 0
    wait_until(lambda: running.job(capsys, 1).get("status") == "running")
    assert running.job(capsys, 1)["gpus"] == [1]
    code, out, _ = running.run(capsys, "kill", "1")
    assert code == 0 and "killed" in out
    assert running.job(capsys, 1)["status"] == "killed"
    code, _, err = running.run(capsys, "kill", "1")
    assert code == 1 and "already ended (killed)" in err
    assert running.run(capsys, "retry", "1")[0] == 0
    wait_until(lambda: running.job(capsys, 1).get("status") == "running")
    wait_until(lambda: "started --sleep 60" in running.run(capsys, "logs", "1")[1])


def test_second_start_refuses(running: Running, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = running.run(capsys, "start", "--gpu-backend", "fake", "--fake-gpus", "x.json")
    assert code == 1
    assert "already running" in err and running.state in err


def test_start_without_gpus_names_the_fake_backend(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi
    code = main(["start", "--state-dir", str(tmp_path / "s"), "--jobs-file", str(tmp_path / "j")])
    assert code == 2
    assert "--gpu-backend fake --fake-gpus FILE" in capsys.readouterr().err


def test_bad_setting_from_environment_is_named(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPUSCHED_MEM_THRESHOLD", "lots")
    assert main(["start", "--state-dir", str(tmp_path / "s")]) == 1
    assert "GPUSCHED_MEM_THRESHOLD" in capsys.readouterr().err
