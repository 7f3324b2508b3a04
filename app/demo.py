"""`gpusched demo`: the whole pipeline on 4 simulated GPUs in a throw-away workspace.

Real parts throughout: a jobs file the scheduler tails, a private tmux server, the in-pane
wrapper, the SQLite state database. Only the GPUs are simulated (a JSON file).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from app.gpus.fake import write_fake_gpus
from app.models import ENDED_STATES
from app.paths import state_paths
from app.service import serve
from app.settings import Settings
from app.status import build_status, format_status
from app.store import Store

TRAIN = """\
import os, sys, time
args = sys.argv[1:]
cuda = args[args.index("--cuda") + 1] if "--cuda" in args else "?"
steps = int(args[args.index("--steps") + 1]) if "--steps" in args else 5
print(f"job {os.environ['GPUSCHED_JOB_ID']} on GPU {cuda}: {' '.join(args)}", flush=True)
for step in range(1, steps + 1):
    time.sleep(0.5)
    print(f"step {step}/{steps}", flush=True)
sys.exit(int(args[args.index("--exit") + 1]) if "--exit" in args else 0)
"""

LLM_CONFIG = {
    "default_requirement": 1.0,
    "models": {
        "qwen2.5-3b-inst": 0.5,
        "qwen2.5-7b-inst": 1.0,
        "qwen2.5-32b-inst": {"gpus": 2, "vram_gb": 60},
    },
}

JOBS = """\
# priority,script_path,conda_env,arguments,allowed_gpus
0,train.py,,--llm qwen2.5-32b-inst --steps 8,
1,train.py,,--llm qwen2.5-3b-inst --steps 6 --seed 1,
1,train.py,,--llm qwen2.5-3b-inst --steps 6 --seed 2,
1,train.py,,--llm qwen2.5-7b-inst --steps 4 --cuda 9,
2,train.py,,--llm qwen2.5-7b-inst --steps 3 --exit 3,3
2,train.py,,--llm qwen2.5-3b-inst --steps 4 --seed 3,0-3
5,train.py,,--llm qwen2.5-3b-inst --steps 6 --seed 1,
x,train.py,,--steps 2,
"""


def make_workspace(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "train.py").write_text(TRAIN)
    (root / "llm_config.json").write_text(json.dumps(LLM_CONFIG, indent=2) + "\n")
    write_fake_gpus(root / "fake_gpus.json", 4, memory_total_mb=81920, name="Fake A100 80GB")
    return root


def demo_settings(root: Path, socket: str, ramp_up: float) -> Settings:
    """A scheduler on the workspace's files, its 4 simulated GPUs and a private tmux server."""
    return Settings(
        jobs_file=root / "jobs.txt",
        llm_config=root / "llm_config.json",
        state_dir=root / "state",
        gpu_backend="fake",
        fake_gpus=root / "fake_gpus.json",
        tmux_socket=socket,
        ramp_up=ramp_up,
    ).validate()


def run_demo(workdir: Path | None = None, keep: bool = False, tui: bool = False) -> int:
    if shutil.which("tmux") is None:
        print("gpusched demo needs tmux: sudo apt-get install tmux", file=sys.stderr)
        return 2
    root = make_workspace(workdir or Path(tempfile.mkdtemp(prefix="gpusched-demo-")))
    socket = f"gpusched-demo-{os.getpid()}"
    settings = demo_settings(root, socket, ramp_up=2.0)
    print(f"workspace {root}: 4 simulated GPUs, private tmux server `tmux -L {socket}`")
    print(f"appending {JOBS.count(chr(10)) - 1} lines to {settings.jobs_file} ...\n")
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(settings, stop, False), daemon=True)
    thread.start()
    (root / "jobs.txt").write_text(JOBS)
    paths = state_paths(settings.state_dir)
    try:
        if tui:
            from app.dashboard.app import DashboardApp

            DashboardApp(paths.ensure()).run()
        else:
            _follow(paths.db, time.time())
    finally:
        stop.set()
        thread.join(timeout=10)
    store = Store(paths.db)
    print()
    print(format_status(build_status(store, paths)))
    _show_log(store, 4)
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, check=False)
    if keep:
        print(f"\nkept {root}: try `gpusched status --state-dir {paths.root}`")
    else:
        shutil.rmtree(root, ignore_errors=True)
    print("\nnext: write your own jobs.txt and run `gpusched start` (see README)")
    return 0


def _show_log(store: Store, job_id: int) -> None:
    job = store.job(job_id)
    if job and job.log_path and Path(job.log_path).exists():
        print(f"\nlog of job {job_id} ({job.log_path}), its --cuda 9 rewritten to its GPU:")
        for line in Path(job.log_path).read_text(errors="replace").splitlines()[:3]:
            print(f"  | {line}")


def _follow(db_path: Path, t0: float, timeout: float = 120.0) -> None:
    """Print every job transition as it happens until all submitted jobs have ended."""
    while not db_path.exists():
        time.sleep(0.05)
    store = Store(db_path)
    last_event = 0
    printed_errors = 0
    last_note = 0
    hinted = False
    while time.time() - t0 < timeout:
        rows = store.db.execute(
            "SELECT e.id, e.job_id, e.status, e.detail, e.at FROM job_events e "
            "WHERE e.id > ? ORDER BY e.id",
            (last_event,),
        ).fetchall()
        for row in rows:
            last_event = row[0]
            job = store.job(row[1])
            args = job.args if job else ""
            print(f"{row[4] - t0:6.1f}s  job {row[1]:<2} {row[2]:<13} {row[3]}  [{args}]")
            if row[2] == "running" and not hinted and job and job.session:
                hinted = True
                print(
                    f"{'':8}(attach while it runs: tmux -L {job.runner[5:] if job.runner else ''}"
                    f" attach -t {job.session})"
                )
        notes = store.db.execute(
            "SELECT id, message FROM events WHERE id > ? AND message LIKE '%duplicate%'",
            (last_note,),
        ).fetchall()
        for note in notes:
            last_note = note[0]
            print(f"{'':8}{note[1]}")
        errors = store.line_errors()
        for err in errors[printed_errors:]:
            print(f"{'':8}error: {err}")
        printed_errors = len(errors)
        jobs = store.jobs()
        if len(jobs) >= 6 and all(j.status in ENDED_STATES for j in jobs):
            break
        time.sleep(0.1)
    store.close()
