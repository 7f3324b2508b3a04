"""A scheduler workspace for tests: jobs file, llm_config, fake GPUs, private tmux server."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

from app import control
from app.daemon import Daemon
from app.gpus.fake import write_fake_gpus
from app.models import Job, JobState
from app.paths import StatePaths
from app.service import build_daemon, serve
from app.settings import Settings
from app.store import Store
from tests.helpers import wait_until

#: A job script that records what it saw (argv, a few env vars) and obeys --sleep/--exit.
JOB_SCRIPT = """\
import json, os, sys, time
args = sys.argv[1:]
def opt(name, default):
    return args[args.index(name) + 1] if name in args else default
out = opt("--out", None)
if out:
    keys = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUSCHED_JOB_ID", "GPUSCHED_GPUS",
            "GPUSCHED_TEST_MARK")
    with open(out, "w") as f:
        json.dump({"argv": args, "env": {k: os.environ.get(k) for k in keys}}, f)
mark = opt("--mark", None)
if mark:  # one line per run, appended: tests count how often each job really ran
    with open(mark, "a") as f:
        f.write(opt("--name", "?") + "\\n")
print("started", " ".join(args), flush=True)
time.sleep(float(opt("--sleep", "0")))
sys.exit(int(opt("--exit", "0")))
"""

LLM_CONFIG = {
    "default_requirement": 1.0,
    "models": {"half": 0.5, "quarter": 0.25, "one": 1.0, "two": 2, "four": 4},
}


@dataclass
class Workspace:
    root: Path
    settings: Settings
    paths: StatePaths
    store: Store
    daemon: Daemon

    @property
    def jobs_file(self) -> Path:
        return self.root / "jobs.txt"

    @property
    def script(self) -> Path:
        return self.root / "job.py"

    def append(self, *lines: str) -> None:
        with self.jobs_file.open("a") as f:
            f.writelines(line + "\n" for line in lines)
        # What the inotify watcher does in `run()`; tick-driven tests call it themselves.
        self.daemon.on_path_event(str(self.jobs_file))

    def job_line(self, args: str, priority: int = 0, allowed: str = "") -> str:
        return f"{priority},{self.script},,{args},{allowed}"

    def tick(self, now: float | None = None) -> None:
        self.daemon.tick(time.time() if now is None else now)

    def job(self, job_id: int) -> Job:
        job = self.store.job(job_id)
        assert job is not None
        return job

    def states(self) -> dict[int, JobState]:
        return {j.id: j.status for j in self.store.jobs()}

    def seen(self, job_id: int) -> dict[str, object]:
        data: dict[str, object] = json.loads((self.root / f"out_{job_id}.json").read_text())
        return data


def make_workspace(root: Path, tmux_socket: str, gpus: int = 2, **overrides: object) -> Workspace:
    root.mkdir(parents=True, exist_ok=True)
    (root / "job.py").write_text(JOB_SCRIPT)
    (root / "llm_config.json").write_text(json.dumps(LLM_CONFIG))
    write_fake_gpus(root / "gpus.json", gpus)
    (root / "jobs.txt").touch()
    settings = Settings(
        jobs_file=root / "jobs.txt",
        llm_config=root / "llm_config.json",
        state_dir=root / "state",
        gpu_backend="fake",
        fake_gpus=root / "gpus.json",
        tmux_socket=tmux_socket,
        ramp_up=0.0,
    )
    settings = replace(settings, **overrides).validate()  # type: ignore[arg-type]
    paths = StatePaths(root / "state").ensure()
    store = Store(paths.db)
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(root),
        "GPUSCHED_TEST_MARK": "from-start",
        "CUDA_VISIBLE_DEVICES": "7",
    }
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    daemon = build_daemon(settings, paths, store)
    daemon.base_env = env
    return Workspace(root, settings, paths, store, daemon)


@contextmanager
def serving(ws: Workspace) -> Iterator[Store]:
    """The real loop (`serve`: recover, watcher, ticks) in a thread; yields a store to read."""
    ws.store.close()
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(ws.settings, stop, False), daemon=True)
    thread.start()
    wait_until(lambda: ws.paths.lock.exists() and ws.paths.lock.read_text().strip())
    store = Store(ws.paths.db)
    try:
        yield store
    finally:
        stop.set()
        control.wake_scheduler(ws.paths)  # cut the loop's sleep short
        thread.join(timeout=10)
        store.close()


def job_status(store: Store, job_id: int) -> JobState | None:
    job = store.job(job_id)
    return None if job is None else job.status
