"""CLI commands while the scheduler is stopped and restarted again and again.

A real `gpusched start` (a subprocess, fake GPUs, a private tmux server) is stopped with
SIGTERM or SIGKILL and started again several times, while other processes run `gpusched add`,
`status --json`, `pause` / `resume`, `kill` and `retry`. Every command either succeeds or
fails with a one-line message and a non-zero exit, never a traceback; every added job runs
exactly once in the end; a paused GPU stays paused through every restart.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from app.control import scheduler_pid
from app.gpus.fake import write_fake_gpus
from app.models import JobState
from app.paths import StatePaths
from app.store import Store
from tests.helpers import wait_until
from tests.workspace import JOB_SCRIPT, LLM_CONFIG

REPO = Path(__file__).resolve().parent.parent
PAUSED_GPU = 3  # paused before the first start; the kill/retry targets may only use it
TOGGLED_GPU = 2  # paused and resumed over and over


@dataclass
class Call:
    argv: list[str]
    code: int
    stdout: str
    stderr: str


@dataclass
class Bench:
    root: Path
    tmux_socket: str
    calls: list[Call] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def state(self) -> Path:
        return self.root / "state"

    @property
    def marks(self) -> Path:
        return self.root / "ran"

    def env(self) -> dict[str, str]:
        path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
        return {"PATH": path, "HOME": str(self.root), "PYTHONPATH": str(REPO)}

    def gpusched(self, *args: str, timeout: float = 60) -> Call:
        argv = [sys.executable, "-m", "app", *args, "--state-dir", str(self.state)]
        done = subprocess.run(
            argv,
            cwd=self.root,
            env=self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        call = Call(list(args), done.returncode, done.stdout, done.stderr)
        with self.lock:
            self.calls.append(call)
        return call

    def start(self) -> subprocess.Popen[bytes]:
        argv = [
            sys.executable, "-m", "app", "start",
            "--state-dir", str(self.state),
            "--jobs-file", str(self.root / "jobs.txt"),
            "--llm-config", str(self.root / "llm_config.json"),
            "--gpu-backend", "fake", "--fake-gpus", str(self.root / "gpus.json"),
            "--tmux-socket", self.tmux_socket,
            "--ramp-up", "0", "--state-interval", "1", "--poll-interval", "0.5",
        ]  # fmt: skip
        log = (self.root / "scheduler.out").open("ab")
        return subprocess.Popen(
            argv, cwd=self.root, env=self.env(), stdout=log, stderr=subprocess.STDOUT
        )

    def ran(self) -> Counter[str]:
        text = self.marks.read_text() if self.marks.exists() else ""
        return Counter(text.split())

    def store(self) -> Store:
        return Store(StatePaths(self.state).db)


def make_bench(root: Path, tmux_socket: str) -> Bench:
    root.mkdir(parents=True, exist_ok=True)
    (root / "job.py").write_text(JOB_SCRIPT)
    (root / "llm_config.json").write_text(json.dumps(LLM_CONFIG))
    write_fake_gpus(root / "gpus.json", 4)
    (root / "jobs.txt").touch()
    return Bench(root, tmux_socket)


def assert_clean(call: Call) -> None:
    """Success, or a clear one-line failure with a non-zero exit: never a traceback."""
    assert "Traceback" not in call.stderr, (call.argv, call.stderr)
    if call.code != 0:
        assert call.stderr.strip().startswith("gpusched: error:"), (call.argv, call.stderr)


def wait_up(bench: Bench, scheduler: subprocess.Popen[bytes]) -> None:
    """Until the scheduler holds its lock (past its start-up); fails early if it died."""
    paths = StatePaths(bench.state)

    def up() -> bool:
        if scheduler.poll() is not None:
            log = (bench.root / "scheduler.out").read_text()[-3000:]
            raise AssertionError(f"the scheduler exited ({scheduler.returncode}):\n{log}")
        return scheduler_pid(paths) == scheduler.pid

    wait_until(up, timeout=60, interval=0.05)


def job_state(store: Store, job_id: int) -> JobState | None:
    job = store.job(job_id)
    return None if job is None else job.status


def job_args(bench: Bench, name: str, sleep: float) -> str:
    return f"--mark {bench.marks} --name {name} --sleep {sleep} --llm quarter"


@pytest.mark.timeout(240)
def test_cli_while_the_scheduler_restarts(tmp_path: Path, tmux_socket: str) -> None:
    bench = make_bench(tmp_path, tmux_socket)
    rng = random.Random(6)
    assert_clean(bench.gpusched("pause", str(PAUSED_GPU)))  # before any scheduler ran
    # Jobs that may only use the paused GPU: they wait, and are killed and retried meanwhile.
    targets = [f"t{i}" for i in range(3)]
    for name in targets:
        call = bench.gpusched(
            "add", "job.py", "--gpus", str(PAUSED_GPU), "--args", job_args(bench, name, 0)
        )
        assert call.code == 0, call
    # Long jobs to kill while they run (or while they are being started).
    victims = [f"v{i}" for i in range(2)]
    for name in victims:
        call = bench.gpusched("add", "job.py", "--gpus", "0-1", "--args", job_args(bench, name, 60))
        assert call.code == 0, call

    stop = threading.Event()
    added: dict[str, int] = {}  # name -> exit code of its `add`
    errors: list[BaseException] = []

    def guarded(fn: object) -> threading.Thread:
        def run() -> None:
            try:
                fn()  # type: ignore[operator]
            except BaseException as exc:  # reported by the main thread
                errors.append(exc)
                stop.set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def adder() -> None:
        i = 0
        while not stop.is_set():
            name = f"j{i}"
            call = bench.gpusched("add", "job.py", "--args", job_args(bench, name, 0.2))
            assert_clean(call)
            added[name] = call.code
            i += 1

    def watcher() -> None:
        paused = str(PAUSED_GPU)
        while not stop.is_set():
            call = bench.gpusched("status", "--json")
            assert_clean(call)
            if call.code == 0:
                status = json.loads(call.stdout)
                for gpu in status["gpus"]:  # known once a scheduler probed them
                    assert gpu["paused"] == (str(gpu["index"]) == paused) or gpu["index"] == 2
            for verb in ("pause", "resume"):
                assert_clean(bench.gpusched(verb, str(TOGGLED_GPU)))

    def killer() -> None:
        for name in victims:  # kill each victim once it started (or the loop ends)
            job_id = victims.index(name) + len(targets) + 1
            while not stop.is_set() and name not in bench.ran():
                time.sleep(0.1)
            assert_clean(bench.gpusched("kill", str(job_id)))
        while not stop.is_set():
            job_id = rng.randint(1, len(targets))
            assert_clean(bench.gpusched("kill", str(job_id)))
            assert_clean(bench.gpusched("retry", str(job_id)))
            assert_clean(bench.gpusched("retry", "999"))  # no such job: a clean error

    threads = [guarded(adder), guarded(watcher), guarded(killer)]
    scheduler = bench.start()
    try:
        for cycle in range(6):
            # Up (it holds the lock: past its start-up), then running for a while.
            wait_up(bench, scheduler)
            time.sleep(rng.uniform(0.3, 1.5))  # commands come in meanwhile
            scheduler.send_signal(signal.SIGKILL if cycle % 2 else signal.SIGTERM)
            scheduler.wait(timeout=30)
            time.sleep(rng.uniform(0.0, 0.8))  # down; commands still come in
            scheduler = bench.start()
            if errors:
                break
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
        assert not errors, errors
        failed = [c for c in bench.calls if c.code != 0]
        assert len(failed) < len(bench.calls) / 2, failed[:5]

        # Quiet now: everything added runs, exactly once.
        store = bench.store()
        try:
            for target in range(1, len(targets) + 1):  # queue the targets again, if killed
                job = store.job(target)
                if job is not None and job.status == JobState.KILLED:
                    assert_clean(bench.gpusched("retry", str(target)))
            lines = (bench.root / "jobs.txt").read_text().splitlines()
            regular = [n for n, code in added.items() if code == 0]
            assert len(lines) == len(targets) + len(victims) + len(regular)

            def settled() -> bool:
                return all(
                    j.status not in (JobState.PENDING, JobState.RUNNING)
                    for j in store.jobs()
                    if j.id > len(targets) + len(victims)
                ) and len(store.jobs()) == len(lines)

            try:
                wait_until(settled, timeout=60, interval=0.2)
            except AssertionError:
                stuck = [
                    (j.id, j.status.value, j.reason, store.history(j.id)[-3:])
                    for j in store.jobs([JobState.PENDING, JobState.RUNNING])
                ]
                log = (bench.root / "scheduler.out").read_text()[-3000:]
                raise AssertionError(f"not settled: {stuck}\n{log}") from None
            ran = bench.ran()
            for name in regular:
                assert ran[name] == 1, (name, ran[name])
            assert all(ran[n] <= 1 for n in added), ran
            states = Counter(j.status for j in store.jobs()[len(targets) + len(victims) :])
            assert states == Counter({JobState.COMPLETED: len(regular)}), states

            # The paused GPU stayed paused through every restart: its jobs never started.
            assert PAUSED_GPU in store.paused()
            assert all(ran[n] == 0 for n in targets), ran
            assert all(store.job(t).status == JobState.PENDING for t in range(1, 4))  # type: ignore[union-attr]
            for offset, name in enumerate(victims):  # killed once, and not started again
                victim_id = len(targets) + 1 + offset
                if job_state(store, victim_id) != JobState.KILLED:  # not started during the loop
                    try:
                        wait_until(lambda name=name: bench.ran()[name], timeout=60)  # type: ignore[misc]
                    except AssertionError:
                        log = (bench.root / "scheduler.out").read_text()[-3000:]
                        raise AssertionError(
                            f"{name} never started: {store.jobs()}\n{log}"
                        ) from None
                    assert_clean(bench.gpusched("kill", str(victim_id)))
                victim = store.job(victim_id)
                assert victim is not None
                kills = [c for c in bench.calls if c.argv == ["kill", str(victim.id)]]
                history = store.history(victim.id)
                assert victim.status == JobState.KILLED, (kills, history)
                assert ran[name] <= 1, ran

            assert_clean(bench.gpusched("resume", str(PAUSED_GPU)))
            wait_until(
                lambda: all(
                    store.job(t).status == JobState.COMPLETED  # type: ignore[union-attr]
                    for t in range(1, len(targets) + 1)
                ),
                timeout=60,
                interval=0.2,
            )
            assert all(bench.ran()[n] == 1 for n in targets), bench.ran()
        finally:
            store.close()

        def job_sessions() -> list[str]:
            listed = subprocess.run(
                ["tmux", "-L", tmux_socket, "list-sessions", "-F", "#{session_name}"],
                capture_output=True,
                text=True,
                check=False,
            ).stdout.split()
            return [s for s in listed if s.startswith("gpujob_")]

        try:  # every job ended: no job session is left (removals wait for the pass's end)
            wait_until(lambda: not job_sessions(), timeout=15, interval=0.2)
        except AssertionError:
            raise AssertionError(f"sessions left: {job_sessions()}") from None
    finally:
        stop.set()
        if scheduler.poll() is None:
            scheduler.send_signal(signal.SIGTERM)
            try:
                scheduler.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.kill(scheduler.pid, signal.SIGKILL)
                scheduler.wait()
    for call in bench.calls:
        assert_clean(call)


@pytest.mark.timeout(120)
def test_config_file_broken_while_running(tmp_path: Path, tmux_socket: str) -> None:
    """The config file is read at start only: breaking it under a running scheduler changes
    nothing until the next start, which refuses it with file:line and a reason (so do the
    commands that read it for the state directory), without a traceback."""
    bench = make_bench(tmp_path, tmux_socket)
    config = bench.root / "gpusched.toml"
    config.write_text(f'mode = "share"\nstate_dir = "{bench.state}"\n')
    scheduler = bench.start()
    try:
        wait_up(bench, scheduler)
        config.write_text('mode = "share"\ngpus = ' + "9" * 5000 + "\n")  # int() refuses it
        assert_clean(bench.gpusched("add", "job.py", "--args", job_args(bench, "a", 0)))
        wait_until(lambda: bench.ran()["a"] == 1, timeout=30)  # the scheduler did not mind
        scheduler.send_signal(signal.SIGTERM)
        assert scheduler.wait(timeout=30) == 0
        scheduler = bench.start()
        assert scheduler.wait(timeout=30) != 0
        out = (bench.root / "scheduler.out").read_text()
        assert "Traceback" not in out, out
        assert f"gpusched: error: {config}:2: invalid TOML: " in out or f"{config}: " in out, out
        # `status` without --state-dir reads state_dir from ./gpusched.toml: a clean error too.
        done = subprocess.run(
            [sys.executable, "-m", "app", "status"],
            cwd=bench.root,
            env=bench.env(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
        assert done.stderr.startswith(f"gpusched: error: {config}"), done.stderr
    finally:
        if scheduler.poll() is None:
            scheduler.send_signal(signal.SIGTERM)
            scheduler.wait(timeout=30)
