"""Regenerate docs/images/dashboard.svg, the README's screenshot, from a real run.

    python docs/make_screenshot.py

A real scheduler (4 simulated GPUs, a private tmux server) runs the demo's jobs; once some
run, one failed and one waits, the dashboard is opened headless and Textual exports the SVG.
"""

from __future__ import annotations

import asyncio
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.dashboard.app import DashboardApp
from app.demo import demo_settings, make_workspace
from app.gpus.fake import update_fake_gpu
from app.paths import state_paths
from app.service import serve
from app.store import Store

JOBS = """\
0,train.py,,--llm qwen2.5-32b-inst --steps 4000,
1,train.py,,--llm qwen2.5-3b-inst --steps 4000 --seed 1,
1,train.py,,--llm qwen2.5-3b-inst --steps 4000 --seed 2,
1,train.py,,--llm qwen2.5-7b-inst --steps 2 --exit 3,
2,train.py,,--llm qwen2.5-7b-inst --steps 4000 --lr 3e-4,
3,train.py,,--llm qwen2.5-32b-inst --steps 4000 --batch_size 1,
x,train.py,,--steps 2,
"""
OUT = Path(__file__).resolve().parent / "images" / "dashboard.svg"


def main() -> None:
    root = make_workspace(Path(tempfile.mkdtemp(prefix="gpusched-shot-")))
    socket = f"gpusched-shot-{os.getpid()}"
    settings = demo_settings(root, socket, ramp_up=0.0)
    stop = threading.Event()
    thread = threading.Thread(target=serve, args=(settings, stop, False), daemon=True)
    thread.start()
    (root / "jobs.txt").write_text(JOBS)
    paths = state_paths(settings.state_dir)
    try:
        while not paths.db.exists():
            time.sleep(0.05)
        store = Store(paths.db)
        while store.counts().get("failed", 0) < 1 or store.counts().get("running", 0) < 4:
            time.sleep(0.1)
        store.close()
        time.sleep(3)  # a few lines of output in the logs
        asyncio.run(shoot(paths.root, root / "fake_gpus.json"))
    finally:
        stop.set()
        thread.join(timeout=10)
        subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
    print(f"wrote {OUT}")


#: Simulated load per GPU (memory MB, utilisation base), varied each second for the sparklines.
LOAD = [(70_000, 0.85), (66_000, 0.8), (38_000, 0.55), (21_000, 0.35)]


async def shoot(state: Path, gpus_file: Path) -> None:
    app = DashboardApp(state_paths(state))
    async with app.run_test(size=(160, 45)) as pilot:
        while not app.polls or app.detail_shown is None:
            await pilot.pause(0.05)
        await pilot.press("2", "down")
        for second in range(20):
            for index, (memory, base) in enumerate(LOAD):
                wobble = 0.12 * math.sin(second / 2 + index)
                update_fake_gpu(
                    gpus_file,
                    index,
                    memory_used_mb=memory + int(wobble * 8000),
                    utilization=round(min(max(base + wobble, 0.0), 1.0), 2),
                )
            await pilot.pause(1.0)
        OUT.parent.mkdir(parents=True, exist_ok=True)
        app.save_screenshot(filename=OUT.name, path=str(OUT.parent))


if __name__ == "__main__":
    main()
