"""Allocation modes and limits through the real scheduler: settings -> policy -> placements.

The allocator's own tests (test_allocator_modes.py) cover each rule in detail; these check
that `--mode`, `--max-workers`, `--min-free-mem-mb`, `MAX_VRAM` and host RAM reach it from the
settings and the fake GPU file, with real tmux sessions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app import control
from app.gpus.fake import update_fake_gpu
from app.models import JobState
from app.settings import SettingsError
from tests.workspace import Workspace, make_workspace


def running_on(ws: Workspace) -> dict[int, tuple[int, ...]]:
    return {j.id: j.gpus for j in ws.store.jobs([JobState.RUNNING])}


def sleepers(ws: Workspace, *llms: str) -> None:
    ws.append(*(ws.job_line(f"--llm {llm} --sleep 30 --name j{i}") for i, llm in enumerate(llms)))


def test_share_mode_packs_halves_and_exclusive_mode_gives_each_job_a_gpu(
    tmp_path: Path, tmux_socket: str
) -> None:
    share = make_workspace(tmp_path / "share", tmux_socket, gpus=2)
    sleepers(share, "half", "half", "half")
    share.tick()
    assert running_on(share) == {1: (0,), 2: (0,), 3: (1,)}
    for job_id in running_on(share):  # the next workspace's sessions get the same names
        control.kill_job(share.store, share.paths, job_id)

    exclusive = make_workspace(tmp_path / "excl", tmux_socket, gpus=2, mode="exclusive")
    sleepers(exclusive, "half", "half", "half")
    exclusive.tick()
    assert running_on(exclusive) == {1: (0,), 2: (1,)}
    assert "GPUs 0-1" in exclusive.job(3).reason


def test_placement_setting_reaches_the_scheduler(tmp_path: Path, tmux_socket: str) -> None:
    """Two half-GPU jobs: packed on GPU 0 by default, one per GPU with `placement = spread`."""
    spread = make_workspace(tmp_path / "spread", tmux_socket, gpus=2, placement="spread")
    sleepers(spread, "half", "half")
    spread.tick()
    assert running_on(spread) == {1: (0,), 2: (1,)}
    for job_id in running_on(spread):  # the next workspace's sessions get the same names
        control.kill_job(spread.store, spread.paths, job_id)
    with pytest.raises(SettingsError, match="placement"):
        make_workspace(tmp_path / "bad", tmux_socket, gpus=2, placement="random")


def test_max_workers_caps_concurrent_jobs(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=4, max_workers=2)
    sleepers(ws, "quarter", "quarter", "quarter")
    ws.tick()
    assert len(running_on(ws)) == 2
    assert "max workers (2)" in ws.job(3).reason


def test_memory_mode_shares_gpus_by_declared_memory(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1, mode="memory")
    update_fake_gpu(tmp_path / "gpus.json", 0, memory_total_mb=16384)
    ws.append(*(ws.job_line(f"--sleep 30 --name m{i} --gpusched-vram 6") for i in range(3)))
    ws.tick()
    # 6 + 6 GB fit in 16 GB; a third 6 GB job does not.
    assert sorted(running_on(ws)) == [1, 2]
    assert ws.job(3).status == JobState.PENDING
    # The directive never reaches the job's command line.
    assert "--gpusched-vram" not in (ws.job(1).command or "")


def test_min_free_mem_and_max_vram_keep_busy_gpus_free(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=2, min_free_mem_mb=20000)
    update_fake_gpu(tmp_path / "gpus.json", 0, memory_used_mb=70000)  # 80 GB total: 10 GB free
    sleepers(ws, "quarter")
    ws.tick()
    assert running_on(ws) == {1: (1,)}

    capped = make_workspace(tmp_path / "capped", tmux_socket, gpus=1, max_vram=0.5)
    update_fake_gpu(tmp_path / "capped" / "gpus.json", 0, memory_used_mb=30000)
    capped.append(capped.job_line("--sleep 30 --gpusched-vram 20 --name v"))
    capped.tick()
    # 30 GB used + 20 GB > half of 80 GB: it waits.
    assert capped.job(1).status == JobState.PENDING


def test_declared_host_ram_waits_for_the_fake_hosts_available_ram(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=2)
    gpus_file = tmp_path / "gpus.json"
    document = json.loads(gpus_file.read_text())
    document["host"] = {"ram_total_mb": 32768, "ram_available_mb": 4096}
    gpus_file.write_text(json.dumps(document))
    ws.append(ws.job_line("--llm quarter --sleep 30 --gpusched-ram 8 --name r"))
    ws.tick()
    job = ws.job(1)
    assert job.status == JobState.PENDING and "RAM" in job.reason
    document["host"]["ram_available_mb"] = 16384
    gpus_file.write_text(json.dumps(document))
    ws.tick()
    assert ws.job(1).status == JobState.RUNNING
