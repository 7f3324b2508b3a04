"""`kill -9` of a real `gpusched start` at random moments while bursts of lines arrive and jobs
start and end. After the last restart: every line ran exactly once, every exit code is the one
the job returned, and no GPU share is left held.

The default run does one seed with 120 lines and 4 kills; `pytest -m soak` runs 20 seeds with
500 lines and 10 kills each (docs/reliability.md has the figures).
"""

from __future__ import annotations

import random
import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from app.gpus.fake import write_fake_gpus
from tests.helpers import wait_until
from tests.test_e2e import Scheduler, _all_ended


def expected_exit(i: int) -> int:
    return 3 if i % 7 == 3 else 0


def crash_burst(root: Path, socket: str, seed: int, lines: int, kills: int) -> None:
    rng = random.Random(seed)
    sched = Scheduler(root, socket)
    write_fake_gpus(root / "gpus.json", 4)
    names = [f"s{seed}j{i}" for i in range(lines)]
    body = [
        sched.line(name, f"--llm quarter --sleep {rng.uniform(0, 0.4):.2f} "
                         f"--exit {expected_exit(i)}")
        for i, name in enumerate(names)
    ]  # fmt: skip
    bursts: list[list[str]] = []
    while body:
        size = rng.randint(1, max(1, lines // 8))
        bursts.append(body[:size])
        body = body[size:]
    pauses = [rng.uniform(0.0, 0.3) for _ in bursts]
    kill_at = sorted(rng.uniform(0.2, 0.8) for _ in range(kills))  # fractions of the bursts

    def writer() -> None:
        for burst, pause in zip(bursts, pauses, strict=True):
            sched.append(*burst)
            time.sleep(pause)

    sched.start()
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        total = sum(pauses) + 0.5
        began = time.monotonic()
        for fraction in kill_at:
            time.sleep(max(0.0, began + fraction * total - time.monotonic()))
            sched.stop(signal.SIGKILL)
            time.sleep(rng.uniform(0.0, 0.5))  # lines and exits arrive while it is down
            sched.start()
        thread.join()
        wait_until(lambda: _all_ended(sched, lines), timeout=60 + lines * 0.5)
        status = sched.status()
    finally:
        thread.join()
        sched.stop()
    runs = Counter((root / "runs.txt").read_text().split())
    assert runs == Counter(names), f"seed {seed}: ran twice or never: {runs - Counter(names)}"
    by_name = {j["args"].split()[1]: j for j in status["jobs"]}
    assert len(by_name) == lines
    for i, name in enumerate(names):
        job = by_name[name]
        want = expected_exit(i)
        assert (job["status"], job["exit_code"]) == (
            "completed" if want == 0 else "failed",
            want,
        ), (seed, name, job)
    assert [g["allocated"] for g in status["gpus"]] == [0.0] * 4, status["gpus"]


@pytest.mark.timeout(400)
def test_sigkill_bursts_one_seed(tmp_path: Path, tmux_socket: str) -> None:
    crash_burst(tmp_path / "ws", tmux_socket, seed=1, lines=120, kills=4)


@pytest.mark.soak
@pytest.mark.timeout(7200)
@pytest.mark.parametrize("seed", range(100, 120))
def test_sigkill_bursts_soak(tmp_path: Path, tmux_socket: str, seed: int) -> None:
    crash_burst(tmp_path / "ws", tmux_socket, seed=seed, lines=500, kills=10)
