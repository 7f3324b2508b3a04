"""The spool folder against the real scheduler: scripts dropped in `1.to_run/` move through
`2.queued/`, `3.running/` and `4.executed/` or `4.failed/` as their jobs do (fake GPUs, private
tmux server, real files)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from app import control
from app.cli import main
from app.gpus.fake import write_fake_gpus
from app.models import Job, JobState
from app.spool import SOURCE_PREFIX
from tests.helpers import wait_until
from tests.workspace import Workspace, job_status, make_workspace, serving

FOLDERS = ("1.to_run", "2.queued", "3.running", "4.executed", "4.failed")


def _spool_ws(tmp_path: Path, tmux_socket: str, gpus: int = 1, **overrides: object) -> Workspace:
    return make_workspace(
        tmp_path, tmux_socket, gpus=gpus, spool_dir=tmp_path / "spool", **overrides
    )


def _spool(ws: Workspace) -> Path:
    assert ws.settings.spool_dir is not None
    return ws.settings.spool_dir.resolve()


def _script_text(ws: Workspace, name: str, code: int = 0, header: str | None = None) -> str:
    """A script that appends its name and folder to runs.txt, then waits for `go_<stem>`."""
    stem = name.split(".", maxsplit=1)[0]
    lines = ["#!/bin/bash"]
    if header is not None:
        lines.append(f"# {header}")
    lines += [
        f'echo "{stem} $(basename "$(dirname "$0")")/$(basename "$0")" >> {ws.root / "runs.txt"}',
        f'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES GPUSCHED_GPUS=$GPUSCHED_GPUS args=$*"'
        f" > {ws.root / f'env_{stem}.txt'}",
        f"while [ ! -e {ws.root / f'go_{stem}'} ]; do sleep 0.05; done",
        f"exit {code}",
    ]
    return "\n".join(lines) + "\n"


def _drop(ws: Workspace, name: str, text: str, notify: bool = True) -> Path:
    """Drop a script in `1.to_run/` and, for tick-driven tests, report it as the watcher would."""
    path = _spool(ws) / "1.to_run" / name
    path.write_text(text)
    if notify:
        ws.daemon.on_path_event(str(path))
    return path


def _go(ws: Workspace, stem: str) -> None:
    (ws.root / f"go_{stem}").touch()


def _runs(ws: Workspace) -> list[str]:
    path = ws.root / "runs.txt"
    return path.read_text().splitlines() if path.exists() else []


def _files(ws: Workspace) -> dict[str, list[str]]:
    """Every spool folder's file names (hidden ones included)."""
    root = _spool(ws)
    return {folder: sorted(p.name for p in (root / folder).iterdir()) for folder in FOLDERS}


def _where(job: Job) -> str:
    """`folder/name` of a job's script, checking it is really there."""
    path = Path(job.script)
    assert path.is_file(), f"job {job.id}'s script {path} is not there"
    return f"{path.parent.name}/{path.name}"


def _wait_state(ws: Workspace, job_id: int, state: JobState, timeout: float = 10.0) -> Job:
    def reached() -> Job | None:
        ws.tick()
        job = ws.job(job_id)
        return job if job.status == state else None

    job = wait_until(reached, timeout=timeout, interval=0.05)
    assert job is not None
    return job


# ---- the folders ----------------------------------------------------------------------------


def test_missing_folders_are_created(tmp_path: Path, tmux_socket: str) -> None:
    (tmp_path / "spool" / "4.executed").mkdir(parents=True)
    (tmp_path / "spool" / "4.executed" / "old.sh").write_text("exit 0\n")
    ws = _spool_ws(tmp_path, tmux_socket)
    assert _files(ws) == {
        "1.to_run": [],
        "2.queued": [],
        "3.running": [],
        "4.executed": ["old.sh"],  # what was there stays, and is not a job
        "4.failed": [],
    }
    ws.tick()
    assert ws.store.jobs() == []


# ---- a script's way through the folders ------------------------------------------------------


@pytest.mark.parametrize(("code", "end_folder", "end_state"), [
    (0, "4.executed", JobState.COMPLETED),
    (1, "4.failed", JobState.FAILED),
])  # fmt: skip
def test_script_moves_through_the_folders(
    tmp_path: Path, tmux_socket: str, code: int, end_folder: str, end_state: JobState
) -> None:
    ws = _spool_ws(tmp_path, tmux_socket)
    ws.store.set_paused(0, True)  # held in 2.queued until the GPU is resumed
    _drop(ws, "train.sh", _script_text(ws, "train.sh", code=code))
    ws.tick()
    job = ws.job(1)
    assert job.status == JobState.PENDING and "paused" in job.reason
    assert job.source == "spool:train.sh"
    assert _where(job) == "2.queued/train.sh"
    assert _files(ws)["1.to_run"] == []
    ws.store.set_paused(0, False)
    ws.tick()
    job = ws.job(1)
    assert job.status == JobState.RUNNING
    assert _where(job) == "3.running/train.sh"
    wait_until(lambda: _runs(ws) == ["train 3.running/train.sh"])  # it runs from 3.running
    # Dropped scripts take no arguments: their GPUs come as CUDA_VISIBLE_DEVICES, no --cuda.
    assert job.command == f"bash {_spool(ws) / '3.running' / 'train.sh'}"
    env = ws.root / "env_train.txt"
    wait_until(lambda: env.exists() and env.read_text().endswith("\n"))
    assert env.read_text() == "CUDA_VISIBLE_DEVICES=0 GPUSCHED_GPUS=0 args=\n"
    ws.tick()
    assert _where(ws.job(1)) == "3.running/train.sh"  # still running: stays
    _go(ws, "train")
    job = _wait_state(ws, 1, end_state)
    assert job.exit_code == code
    assert _where(job) == f"{end_folder}/train.sh"
    files = _files(ws)
    assert files[end_folder] == ["train.sh"]
    assert sum(len(names) for names in files.values()) == 1


def test_killed_script_ends_in_failed(tmp_path: Path, tmux_socket: str) -> None:
    ws = _spool_ws(tmp_path, tmux_socket, gpus=2)
    _drop(ws, "run.sh", _script_text(ws, "run.sh"))
    _drop(ws, "wait.sh", _script_text(ws, "wait.sh"))
    ws.store.set_paused(1, True)
    ws.tick()
    running = next(j for j in ws.store.jobs() if j.status == JobState.RUNNING)
    pending = next(j for j in ws.store.jobs() if j.status == JobState.PENDING)
    wait_until(lambda: len(_runs(ws)) == 1)
    ws.store.set_paused(0, True)  # nothing else may start once the GPU frees up
    assert "killed" in control.kill_job(ws.store, ws.paths, running.id)
    assert "removed from the queue" in control.kill_job(ws.store, ws.paths, pending.id)
    ws.tick()
    for job in (ws.job(running.id), ws.job(pending.id)):
        assert job.status == JobState.KILLED
        assert _where(job).startswith("4.failed/")
    assert _files(ws)["4.failed"] == ["run.sh", "wait.sh"]
    assert not _files(ws)["3.running"] and not _files(ws)["2.queued"]


def test_retry_of_a_failed_script_moves_it_back_and_runs_it_again(
    tmp_path: Path, tmux_socket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = _spool_ws(tmp_path, tmux_socket)
    # Fails until `ok` exists next to the runs file.
    text = _script_text(ws, "flaky.sh").replace("exit 0", f"test -e {ws.root / 'ok'}")
    _drop(ws, "flaky.sh", text)
    _go(ws, "flaky")
    ws.tick()
    job = _wait_state(ws, 1, JobState.FAILED)
    assert _where(job) == "4.failed/flaky.sh"
    (ws.root / "ok").touch()
    ws.store.set_paused(0, True)
    assert main(["retry", "1", "--state-dir", str(ws.paths.root)]) == 0  # `gpusched retry 1`
    assert "job 1 queued again" in capsys.readouterr().out
    ws.tick()
    assert ws.job(1).status == JobState.PENDING
    assert _where(ws.job(1)) == "2.queued/flaky.sh"
    ws.store.set_paused(0, False)
    ws.tick()
    assert _where(ws.job(1)) == "3.running/flaky.sh"
    job = _wait_state(ws, 1, JobState.COMPLETED)
    assert _where(job) == "4.executed/flaky.sh"
    assert _runs(ws) == ["flaky 3.running/flaky.sh"] * 2
    assert len(ws.store.jobs()) == 1


def test_same_name_dropped_twice_runs_twice(tmp_path: Path, tmux_socket: str) -> None:
    ws = _spool_ws(tmp_path, tmux_socket, gpus=2)
    text = _script_text(ws, "same.sh")
    _drop(ws, "same.sh", text)
    ws.tick()
    assert _where(ws.job(1)) == "3.running/same.sh"
    _drop(ws, "same.sh", text)  # identical content, same name
    ws.tick()
    assert ws.job(2).status == JobState.RUNNING
    assert _where(ws.job(2)) == "3.running/same.1.sh"  # the suffix stays last
    assert ws.job(2).source == "spool:same.sh"
    wait_until(lambda: len(_runs(ws)) == 2)
    _go(ws, "same")
    _wait_state(ws, 1, JobState.COMPLETED)
    _wait_state(ws, 2, JobState.COMPLETED)
    assert _files(ws)["4.executed"] == ["same.1.sh", "same.sh"]
    # A third drop, after both ended: a new job again, and no name clash in 4.executed.
    _drop(ws, "same.sh", text)
    ws.tick()
    job = _wait_state(ws, 3, JobState.COMPLETED)
    assert _where(job) == "4.executed/same.2.sh"
    assert sorted(_runs(ws)) == ["same 3.running/same.1.sh"] + ["same 3.running/same.sh"] * 2


def test_names_without_suffix_and_many_dots(tmp_path: Path, tmux_socket: str) -> None:
    ws = _spool_ws(tmp_path, tmux_socket, gpus=2)
    _go(ws, "job")
    for _ in range(2):
        _drop(ws, "job.v2.sh", _script_text(ws, "job.v2.sh"))
        ws.tick()
    plain = _drop(ws, "job", _script_text(ws, "job"))
    plain.chmod(0o755)  # no suffix: run as an executable
    ws.tick()
    runs = ws.root / "runs.txt"
    python = (
        f"import os, sys\nwith open({str(runs)!r}, 'a') as f:\n"
        "    print('py', os.environ['CUDA_VISIBLE_DEVICES'], *sys.argv[1:], file=f)\n"
    )
    _drop(ws, "job.py", python)  # a .py script runs with python3
    ws.tick()
    for job_id in (1, 2, 3, 4):
        _wait_state(ws, job_id, JobState.COMPLETED)
    assert _files(ws)["4.executed"] == ["job", "job.py", "job.v2.1.sh", "job.v2.sh"]
    assert any(line in ("py 0", "py 1") for line in _runs(ws))


def test_hidden_and_temporary_files_are_ignored(tmp_path: Path, tmux_socket: str) -> None:
    ws = _spool_ws(tmp_path, tmux_socket)
    ignored = [".x.sh", "x.sh.swp", "x.sh~", "x.sh.tmp", "x.sh.part"]
    for name in ignored:
        _drop(ws, name, _script_text(ws, "x.sh"))
    (_spool(ws) / "1.to_run" / "subdir.sh").mkdir()  # a folder is no script either
    (_spool(ws) / "1.to_run" / "link.sh").symlink_to(ws.root / "job.py")  # nor a link
    ws.tick()
    ws.tick()
    assert ws.store.jobs() == []
    assert _files(ws)["1.to_run"] == sorted([*ignored, "link.sh", "subdir.sh"])
    # Renamed when complete (what editors and careful copies do): now it is a job.
    inbox = _spool(ws) / "1.to_run"
    (inbox / ".x.sh").rename(inbox / "x.sh")
    ws.daemon.on_path_event(str(inbox / "x.sh"))
    _go(ws, "x")
    ws.tick()
    job = _wait_state(ws, 1, JobState.COMPLETED)
    assert _where(job) == "4.executed/x.sh"
    assert len(ws.store.jobs()) == 1


def test_header_of_a_spooled_script_is_honoured(tmp_path: Path, tmux_socket: str) -> None:
    ws = _spool_ws(tmp_path, tmux_socket)
    write_fake_gpus(tmp_path / "gpus.json", 1, memory_total_mb=16 * 1024)
    _drop(ws, "big.sh", _script_text(ws, "big.sh", header='{"requirements": {"vram": 20}}'))
    _drop(ws, "bad.sh", _script_text(ws, "bad.sh", header='{"requirements": {"vram": 0}}'))
    _drop(ws, "ok.sh", _script_text(ws, "ok.sh", header='{"requirements": {"vram": 8}}'))
    _go(ws, "ok")
    ws.tick()
    jobs = {Path(j.script).name: j for j in ws.store.jobs()}
    big, bad, ok = jobs["big.sh"], jobs["bad.sh"], jobs["ok.sh"]
    assert json.loads(big.declared) == {"vram_mb": 20480}
    assert big.status == JobState.UNSCHEDULABLE and "20480 MB" in big.reason
    assert bad.status == JobState.UNSCHEDULABLE
    assert bad.reason.startswith(f"{_spool(ws) / '2.queued' / 'bad.sh'}:2: ")
    assert "must be a positive number of GB" in bad.reason
    assert ok.status == JobState.RUNNING and ok.vram_mb == 8192
    ws.tick()  # unschedulable scripts are moved on the next pass
    assert _where(ws.job(big.id)) == "4.failed/big.sh"
    assert _where(ws.job(bad.id)) == "4.failed/bad.sh"
    assert _where(_wait_state(ws, ok.id, JobState.COMPLETED)) == "4.executed/ok.sh"


# ---- the real loop ----------------------------------------------------------------------------


def test_drop_is_picked_up_by_the_running_scheduler(tmp_path: Path, tmux_socket: str) -> None:
    ws = _spool_ws(tmp_path, tmux_socket)
    _go(ws, "a")
    _go(ws, "b")
    with serving(ws) as store:
        # The fallback re-read is 30 s away (monitor_interval): only the watcher is this quick.
        _drop(ws, "a.sh", _script_text(ws, "a.sh"), notify=False)
        wait_until(lambda: job_status(store, 1) == JobState.COMPLETED, timeout=8)
        wait_until(lambda: _files(ws)["4.executed"] == ["a.sh"])
        # A careful writer: a hidden temporary file renamed into place when complete.
        hidden = _drop(ws, ".b.sh", _script_text(ws, "b.sh", code=1), notify=False)
        hidden.rename(hidden.with_name("b.sh"))
        wait_until(lambda: job_status(store, 2) == JobState.FAILED, timeout=8)
        wait_until(lambda: _files(ws)["4.failed"] == ["b.sh"])
        assert _runs(ws) == ["a 3.running/a.sh", "b 3.running/b.sh"]


def test_file_left_in_queued_by_a_crash_is_queued_on_start(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = _spool_ws(tmp_path, tmux_socket)
    # A crash between the move to 2.queued and the record of the job leaves this behind.
    queued = _spool(ws) / "2.queued"
    (queued / "orphan.sh").write_text(_script_text(ws, "orphan.sh"))
    (queued / ".orphan.sh.swp").write_text("an editor's swap file: not a job")
    _go(ws, "orphan")
    with serving(ws) as store:
        wait_until(lambda: job_status(store, 1) == JobState.COMPLETED, timeout=8)
        job = store.job(1)
        assert job is not None and job.source == f"{SOURCE_PREFIX}orphan.sh"
        # The end is recorded first, then the script follows (in the same pass).
        wait_until(lambda: _files(ws)["4.executed"] == ["orphan.sh"])
        assert _where(store.job(1) or job) == "4.executed/orphan.sh"
        assert len(store.jobs()) == 1
    assert _files(ws)["2.queued"] == [".orphan.sh.swp"]
    assert _runs(ws) == ["orphan 3.running/orphan.sh"]


def test_restart_does_not_queue_known_scripts_again(tmp_path: Path, tmux_socket: str) -> None:
    ws = _spool_ws(tmp_path, tmux_socket)
    ws.store.set_paused(0, True)
    _drop(ws, "keep.sh", _script_text(ws, "keep.sh"))
    ws.tick()
    assert _where(ws.job(1)) == "2.queued/keep.sh"
    ws.store.close()
    ws2 = _spool_ws(tmp_path, tmux_socket)
    assert ws2.daemon.spool is not None
    assert ws2.daemon.spool.recover(time.time()) == []  # its job is known: nothing new
    ws2.store.set_paused(0, False)
    _go(ws2, "keep")
    job = _wait_state(ws2, 1, JobState.COMPLETED)
    assert _where(job) == "4.executed/keep.sh"
    assert len(ws2.store.jobs()) == 1
    ws2.store.close()


# ---- moving scripts back by hand --------------------------------------------------------------


@pytest.mark.parametrize("folder", ["4.executed", "4.failed"])
def test_script_moved_back_to_to_run_runs_again(
    tmp_path: Path, tmux_socket: str, folder: str
) -> None:
    """`mv 4.failed/x.sh 1.to_run/` keeps the file's inode and mtime: it is still a new drop."""
    ws = _spool_ws(tmp_path, tmux_socket)
    code = 0 if folder == "4.executed" else 1
    _drop(ws, "again.sh", _script_text(ws, "again.sh", code=code))
    _go(ws, "again")
    ws.tick()
    first = _wait_state(ws, 1, JobState.COMPLETED if code == 0 else JobState.FAILED)
    inbox = _spool(ws) / "1.to_run"
    shutil.move(first.script, inbox / "again.sh")
    ws.daemon.on_path_event(str(inbox / "again.sh"))
    ws.tick()
    assert [j.id for j in ws.store.jobs()] == [1, 2]  # a new job, not a duplicate of job 1
    assert ws.job(1).status == first.status  # the old one is left as it ended
    wait_until(lambda: len(_runs(ws)) == 2)
    rerun = _wait_state(ws, 2, JobState.COMPLETED if code == 0 else JobState.FAILED)
    assert _where(rerun) == f"{folder}/again.sh"
    assert sum(len(names) for names in _files(ws).values()) == 1
