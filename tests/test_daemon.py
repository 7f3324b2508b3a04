"""The scheduler pass by pass (`Daemon.tick`), on fake GPUs and a real private tmux server."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

from app.gpus.fake import update_fake_gpu
from app.models import JobState
from app.store import Store
from tests.helpers import wait_until
from tests.workspace import Workspace, make_workspace


def _wait_state(ws: Workspace, job_id: int, state: JobState, timeout: float = 15.0) -> None:
    def reached() -> bool:
        ws.tick()
        return ws.job(job_id).status == state

    wait_until(reached, timeout=timeout, interval=0.05)


def test_two_half_jobs_share_a_gpu_with_rewritten_cuda(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=2)
    out1, out2 = tmp_path / "out_1.json", tmp_path / "out_2.json"
    ws.append(
        ws.job_line(f"--llm half --out {out1} --sleep 1 --cuda 5"),
        ws.job_line(f"--llm=half --out {out2} --sleep 1"),
    )
    ws.tick()
    jobs = {j.id: j for j in ws.store.jobs()}
    assert {j.status for j in jobs.values()} == {JobState.RUNNING}
    assert jobs[1].gpus == jobs[2].gpus == (0,)  # packed onto one GPU, GPU 1 kept whole
    assert jobs[1].share == jobs[2].share == 0.5
    _wait_state(ws, 1, JobState.COMPLETED)
    _wait_state(ws, 2, JobState.COMPLETED)
    seen1, seen2 = ws.seen(1), ws.seen(2)
    assert seen1["argv"] == ["--llm", "half", "--out", str(out1), "--sleep", "1", "--cuda", "0"]
    assert seen2["argv"][-2:] == ["--cuda", "0"]  # absent: added, as the old tool did
    env = seen1["env"]
    assert isinstance(env, dict)
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert env["CUDA_VISIBLE_DEVICES"] is None  # not set while --cuda carries the ids
    assert env["GPUSCHED_JOB_ID"] == "1" and env["GPUSCHED_GPUS"] == "0"
    assert env["GPUSCHED_TEST_MARK"] == "from-start"  # the scheduler's environment
    assert ws.job(1).exit_code == 0
    log = Path(ws.job(1).log_path or "").read_text()
    assert "started --llm half" in log


def test_exit_code_failed_and_multi_gpu(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=3)
    ws.append(ws.job_line("--llm two --exit 3"), ws.job_line("--llm one --sleep 0.5"))
    ws.tick()
    job1, job2 = ws.job(1), ws.job(2)
    assert job1.gpus == (0, 1) and job2.gpus == (2,)
    _wait_state(ws, 1, JobState.FAILED)
    assert ws.job(1).exit_code == 3
    _wait_state(ws, 2, JobState.COMPLETED)


def test_pending_reason_paused_gpu_and_resume(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    ws.store.set_paused(0, True)
    ws.append(ws.job_line("--llm half"))
    ws.tick()
    job = ws.job(1)
    assert job.status == JobState.PENDING
    assert "GPU 0 paused" in job.reason
    ws.store.set_paused(0, False)
    ws.tick()
    assert ws.job(1).status in (JobState.RUNNING, JobState.COMPLETED)


def test_malformed_lines_are_reported_and_do_not_stop(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=2)
    ws.append(
        "x,job.py,,--a,",
        "0,missing.py,,,",
        ws.job_line("--llm half", allowed="7"),
        ws.job_line("--llm half --ok"),
    )
    ws.tick()
    errors = [str(e) for e in ws.store.line_errors()]
    assert errors[0].startswith("jobs.txt:1: priority 'x'")
    assert errors[1].startswith("jobs.txt:2: script") and "not found" in errors[1]
    assert errors[2].startswith("jobs.txt:3: unknown GPU 7")
    assert [j.args for j in ws.store.jobs()] == ["--llm half --ok"]


def test_duplicates_skipped_failed_requeued(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    ws.append(ws.job_line("--exit 2"))
    ws.tick()
    _wait_state(ws, 1, JobState.FAILED)
    ws.append(ws.job_line("--exit 2", priority=3))  # identical to a failed job: queued again
    ws.tick()
    assert ws.job(1).status in (JobState.RUNNING, JobState.PENDING)
    ws.append(ws.job_line("--exit  2", priority=1))  # same shell words while running: duplicate
    ws.tick()
    assert len(ws.store.jobs()) == 1
    assert any("duplicate of job 1" in msg for _, _, msg in ws.store.events())


def test_unschedulable_at_once(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=4)
    ws.append(ws.job_line("--llm four", allowed="0-1"), ws.job_line("--llm bad"))
    (tmp_path / "llm_config.json").write_text(
        json.dumps({"default_requirement": 1.0, "models": {"four": 4, "bad": 1.5}})
    )
    ws.tick()
    assert ws.job(1).status == JobState.UNSCHEDULABLE
    assert "4 GPUs" in ws.job(1).reason
    assert ws.job(2).status == JobState.UNSCHEDULABLE
    assert "1.5" in ws.job(2).reason


def test_probe_failure_places_nothing_and_recovers(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    good = (tmp_path / "gpus.json").read_text()
    (tmp_path / "gpus.json").write_text("{not json")
    ws.append(ws.job_line("--llm half"))
    ws.tick()
    assert ws.job(1).status == JobState.PENDING
    assert "GPUs unknown" in ws.job(1).reason
    (tmp_path / "gpus.json").write_text(good)
    ws.tick()
    assert ws.job(1).status == JobState.RUNNING


def test_busy_gpu_of_other_users_is_avoided(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=2)
    update_fake_gpu(tmp_path / "gpus.json", 0, memory_used_mb=80000, utilization=0.99)
    ws.append(ws.job_line("--llm half"))
    ws.tick()
    assert ws.job(1).gpus == (1,)


def test_launch_failure_backs_off_then_fails(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(
        tmp_path, tmux_socket, gpus=1, max_assign_attempts=2, assign_retry_wait=10.0
    )
    # A session with the name the job will get makes tmux refuse the launch: a real failure.
    subprocess.run(
        ["tmux", "-L", tmux_socket, "new-session", "-d", "-s", "gpujob_1_0_job", "sleep 60"],
        check=True,
    )
    ws.append(ws.job_line("--llm one"))
    now = time.time()
    ws.tick(now)
    job = ws.job(1)
    assert job.status == JobState.PENDING and job.attempts == 1
    assert "attempt 1/2" in job.reason
    ws.tick(now + 1)  # still backing off: not tried again
    assert ws.job(1).attempts == 1
    ws.tick(now + 11)
    assert ws.job(1).status == JobState.FAILED
    assert "2 times" in ws.job(1).reason


def test_restart_readopts_records_and_loses(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=3)
    ws.append(
        ws.job_line("--sleep 30"),
        ws.job_line("--sleep 0.5 --exit 4"),
        ws.job_line("--sleep 30 --vanish"),
    )
    ws.tick()
    assert set(ws.states().values()) == {JobState.RUNNING}
    # The scheduler is gone; meanwhile job 2 ends, and job 3's wrapper dies without a word
    # (SIGKILL) before its session is removed by hand: nothing records how job 3 ended.
    wrapper_pid = ws.job(3).pid
    assert wrapper_pid is not None
    ws.store.close()
    wait_until(lambda: ws.paths.exit_file(2).exists())
    os.kill(wrapper_pid, signal.SIGKILL)
    subprocess.run(["tmux", "-L", tmux_socket, "kill-session", "-t", "gpujob_3_2_job"], check=True)
    ws2 = make_workspace(tmp_path, tmux_socket, gpus=3)
    ws2.daemon.reaper.reconcile(time.time())
    assert ws2.states() == {1: JobState.RUNNING, 2: JobState.FAILED, 3: JobState.LOST}
    assert ws2.job(2).exit_code == 4
    assert "vanished" in ws2.job(3).reason
    ws2.append(ws2.job_line("--llm one --next"), ws2.job_line("--llm one --next2"))
    ws2.tick()
    # GPUs 1 and 2 were freed by the ended and the lost job; GPU 0 is the re-adopted job's.
    assert {ws2.job(4).gpus, ws2.job(5).gpus} == {(1,), (2,)}
    ws2.store.close()


def test_crash_between_marking_and_launching_requeues(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    ws.append(ws.job_line("--sleep 0"))
    ws.daemon.ingest(time.time())
    # What a crash right after the running transition leaves behind: no session, launched=0.
    ws.store.transition(
        1,
        JobState.RUNNING,
        when=[JobState.PENDING],
        gpus="0",
        share=1.0,
        session="gpujob_1_0_job",
        runner=ws.daemon.runner_id,
        launched=0,
    )
    ws2 = make_workspace(tmp_path, tmux_socket, gpus=1)
    ws2.daemon.reaper.reconcile(time.time())
    assert ws2.job(1).status == JobState.PENDING
    _wait_state(ws2, 1, JobState.COMPLETED)
    runs = [s for _, s, _ in ws2.store.history(1)].count("running")
    assert runs == 2  # marked twice, launched once: the exit record exists exactly once


def test_restart_does_not_resubmit_lines(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    ws.append(ws.job_line("--a"), ws.job_line("--b"))
    ws.daemon.ingest(time.time())
    ws.store.close()
    ws2 = make_workspace(tmp_path, tmux_socket, gpus=1)
    assert ws2.daemon.ingest(time.time()) == []
    store = Store(ws2.paths.db)
    assert len(store.jobs()) == 2


def test_rewrites_submit_only_new_lines_even_read_mid_save(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    a, b, c, d = (ws.job_line(f"--{x}") for x in "abcd")
    ws.append(a, b)
    ws.daemon.ingest(time.time())
    # An editor saving in place: truncate (the scheduler happens to read now), then write.
    ws.jobs_file.write_text("")
    ws.daemon.ingest(time.time())
    ws.jobs_file.write_text(f"{a}\n{c}\n{b}\n")
    ws.daemon.ingest(time.time())
    # An atomic replace (write a temp file, rename it over the jobs file).
    tmp = tmp_path / "jobs.txt.tmp"
    tmp.write_text(f"{a}\n{c}\n{b}\n{d}\n")
    tmp.replace(ws.jobs_file)
    ws.daemon.ingest(time.time())
    # Deleted and recreated with the old lines only: nothing new.
    ws.jobs_file.unlink()
    ws.daemon.ingest(time.time())
    ws.jobs_file.write_text(f"{a}\n{b}\n")
    ws.daemon.ingest(time.time())
    assert [j.args for j in ws.store.jobs()] == ["--a", "--b", "--c", "--d"]
    assert [j.source for j in ws.store.jobs()][2:] == ["jobs.txt:2", "jobs.txt:4"]
