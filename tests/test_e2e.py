"""`gpusched start` as a real subprocess: lines in, tmux sessions, exit codes; SIGKILL + restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from app.gpus.fake import write_fake_gpus
from tests.helpers import wait_until
from tests.workspace import JOB_SCRIPT, LLM_CONFIG


class Scheduler:
    def __init__(self, root: Path, socket: str) -> None:
        self.root = root
        self.socket = socket
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(exist_ok=True)
        (root / "job.py").write_text(JOB_SCRIPT)
        (root / "llm_config.json").write_text(json.dumps(LLM_CONFIG))
        write_fake_gpus(root / "gpus.json", 2)
        (root / "jobs.txt").write_text("# priority,script_path,conda_env,arguments,allowed_gpus\n")

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "app", *args, "--state-dir", str(self.root / "state")],
            capture_output=True,
            text=True,
            cwd=self.root,
            check=False,
            timeout=60,
        )

    def start(self) -> None:
        log = (self.root / "scheduler.out").open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "app",
                "start",
                "--jobs-file",
                "jobs.txt",
                "--llm-config",
                "llm_config.json",
                "--state-dir",
                "state",
                "--gpu-backend",
                "fake",
                "--fake-gpus",
                "gpus.json",
                "--tmux-socket",
                self.socket,
                "--ramp-up",
                "0",
                "--state-interval",
                "1",
            ],
            cwd=self.root,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        wait_until(lambda: self.status()["scheduler"]["running"], timeout=20)

    def status(self) -> dict[str, Any]:
        result = self.cli("status", "--json")
        assert result.returncode == 0, result.stderr
        data: dict[str, Any] = json.loads(result.stdout)
        return data

    def append(self, *lines: str) -> None:
        with (self.root / "jobs.txt").open("a") as f:
            f.writelines(line + "\n" for line in lines)

    def line(self, name: str, args: str, priority: int = 0, allowed: str = "") -> str:
        out = self.root / f"out_{name}.json"
        mark = self.root / "runs.txt"
        return f"{priority},job.py,,--name {name} --out {out} --mark {mark} {args},{allowed}"

    def jobs(self) -> dict[str, dict[str, Any]]:
        return {j["args"].split()[1]: j for j in self.status()["jobs"]}

    def stop(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(timeout=20)


def _all_ended(sched: Scheduler, count: int) -> bool:
    jobs = sched.status()["jobs"]
    return len(jobs) == count and all(j["status"] not in ("pending", "running") for j in jobs)


def test_end_to_end_jobs_run_in_tmux(tmp_path: Path, tmux_socket: str) -> None:
    sched = Scheduler(tmp_path / "ws", tmux_socket)
    sched.start()
    try:
        second = sched.cli("start", "--gpu-backend", "fake", "--fake-gpus", "gpus.json")
        assert second.returncode == 1
        assert "already running" in second.stderr
        sched.append(
            sched.line("a", "--llm half --sleep 2 --cuda 7"),
            sched.line("b", "--llm half --sleep 2"),
            sched.line("c", "--llm two --sleep 1", priority=1),
            sched.line("d", "--llm quarter --exit 3", priority=2),
            "bad,line",
        )
        # Jobs are seen in tmux while they run.
        wait_until(lambda: len(_sessions(tmux_socket)) >= 2, timeout=20)
        wait_until(lambda: _all_ended(sched, 4), timeout=60)
        jobs = sched.jobs()
        assert jobs["a"]["gpus"] == jobs["b"]["gpus"]  # two 0.5 jobs shared one GPU
        assert sorted(jobs["c"]["gpus"]) == [0, 1]
        assert jobs["a"]["session"].startswith(f"gpujob_{jobs['a']['id']}_")
        for name in ("a", "b", "c"):
            assert jobs[name]["status"] == "completed" and jobs[name]["exit_code"] == 0
        assert jobs["d"]["status"] == "failed" and jobs["d"]["exit_code"] == 3
        seen = json.loads((sched.root / "out_a.json").read_text())
        cuda = seen["argv"][seen["argv"].index("--cuda") + 1]
        assert cuda == str(jobs["a"]["gpus"][0])
        assert sched.status()["errors"] == [
            "jobs.txt:6: expected 5 comma-separated fields "
            "(priority,script_path,conda_env,arguments,"
            "allowed_gpus), got 2"
        ]
    finally:
        sched.stop()
    assert sched.proc is not None and sched.proc.returncode == 0


def _sessions(socket: str) -> list[str]:
    result = subprocess.run(
        ["tmux", "-L", socket, "list-sessions", "-F", "#{session_name}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [s for s in result.stdout.split() if s.startswith("gpujob_")]


def test_sigkill_mid_run_loses_nothing_runs_nothing_twice(tmp_path: Path, tmux_socket: str) -> None:
    sched = Scheduler(tmp_path / "ws", tmux_socket)
    sched.start()
    names = [f"j{i}" for i in range(6)]
    sched.append(*(sched.line(n, "--llm one --sleep 1.5") for n in names[:4]))
    wait_until(lambda: sum(j["status"] == "running" for j in sched.status()["jobs"]) == 2)
    sched.stop(signal.SIGKILL)  # mid-run: two running, two pending
    sched.append(*(sched.line(n, "--llm one --sleep 0.2") for n in names[4:]))
    # An identical line while the scheduler is down must still be a duplicate after restart.
    sched.append(sched.line("j0", "--llm one --sleep 1.5", priority=5))
    sched.start()
    try:
        wait_until(lambda: _all_ended(sched, 6), timeout=90)
        jobs = sched.jobs()
        assert {n: jobs[n]["status"] for n in names} == dict.fromkeys(names, "completed")
        runs = Counter((sched.root / "runs.txt").read_text().split())
        assert runs == Counter(names)  # every job ran exactly once
    finally:
        sched.stop()
    os.sync()
