"""Inputs beyond jobs.txt against the real scheduler: the commands file, script headers,
`--gpusched-*` directives, `log_dir` and `gpu_ids` (fake GPUs, private tmux server)."""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path

import pytest

from app import control
from app.cli import main
from app.gpus.fake import write_fake_gpus
from app.models import Job, JobState
from tests.helpers import wait_until
from tests.workspace import JOB_SCRIPT, Workspace, job_status, make_workspace, serving

GB16 = 16 * 1024


def _wait_state(ws: Workspace, job_id: int, state: JobState, timeout: float = 10.0) -> Job:
    def reached() -> Job | None:
        ws.tick()
        job = ws.job(job_id)
        return job if job.status == state else None

    job = wait_until(reached, timeout=timeout, interval=0.05)
    assert job is not None
    return job


def _commands_ws(tmp_path: Path, tmux_socket: str, gpus: int = 2, **overrides: object) -> Workspace:
    """A workspace whose commands file lives in its own folder (`work/`), to see the cwd."""
    work = tmp_path / "work"
    work.mkdir(parents=True)
    (work / "commands.txt").touch()
    return make_workspace(
        tmp_path, tmux_socket, gpus=gpus, commands_file=work / "commands.txt", **overrides
    )


def _add_commands(ws: Workspace, *lines: str) -> None:
    commands = ws.settings.commands_file
    assert commands is not None
    with commands.open("a") as f:
        f.writelines(line + "\n" for line in lines)
    ws.daemon.on_path_event(str(commands.resolve()))  # what the watcher does in run()


def _script(path: Path, header: str | None, body: str = "", shebang: bool = True) -> Path:
    """A bash script: optional `#!` line, optional header line, then `body`."""
    lines = ["#!/bin/bash"] if shebang else []
    if header is not None:
        lines.append(f"# {header}")
    path.write_text("\n".join([*lines, body]) + "\n")
    return path


#: A .sh body that writes its arguments, one per line, next to itself (cwd = its folder).
ARGS_BODY = 'printf "%s\\n" "$@" > "args_$GPUSCHED_JOB_ID.txt"'


# ---- commands file ---------------------------------------------------------------------------


def test_commands_file_lines_run_as_shell_code_in_its_folder(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = _commands_ws(tmp_path, tmux_socket)
    _add_commands(
        ws,
        "# a comment, then a blank line",
        "",
        "   ",
        "echo $((1+2)) > out.txt && exit 3",
        '  env | grep -E "^(CUDA_VISIBLE_DEVICES|GPUSCHED_GPUS)=" | sort > env.txt  ',
    )
    ws.tick()
    jobs = ws.store.jobs()
    assert [(j.kind, j.source) for j in jobs] == [
        ("command", "commands.txt:4"),
        ("command", "commands.txt:5"),
    ]
    assert jobs[1].script.startswith("env | grep")  # surrounding blanks trimmed
    failed = _wait_state(ws, 1, JobState.FAILED)
    assert failed.exit_code == 3
    assert failed.command == "echo $((1+2)) > out.txt && exit 3"  # the line as written
    work = tmp_path / "work"
    assert (work / "out.txt").read_text() == "3\n"  # shell arithmetic, in the file's folder
    done = _wait_state(ws, 2, JobState.COMPLETED)
    gpu = str(done.gpus[0])
    # No --cuda to rewrite in shell code: the GPUs reach it through the environment only,
    # replacing the scheduler's own CUDA_VISIBLE_DEVICES (7 in the workspace).
    assert (work / "env.txt").read_text().splitlines() == [
        f"CUDA_VISIBLE_DEVICES={gpu}",
        f"GPUSCHED_GPUS={gpu}",
    ]
    assert not (tmp_path / "out.txt").exists()


def test_commands_file_llm_requirement_and_duplicates(tmp_path: Path, tmux_socket: str) -> None:
    ws = _commands_ws(tmp_path, tmux_socket, gpus=1)
    _add_commands(
        ws,
        "sleep 0.3 # --llm half",  # `--llm NAME` anywhere in the command picks the model
        "sleep 0.3; true --llm=quarter",
        "echo plain",
    )
    ws.tick()
    jobs = {j.id: j for j in ws.store.jobs()}
    assert jobs[1].requirement == 0.5 and jobs[2].requirement == 0.25
    assert jobs[3].requirement == 1.0  # the default: waits for the shared GPU to empty
    assert jobs[1].status == jobs[2].status == JobState.RUNNING
    assert jobs[1].gpus == jobs[2].gpus == (0,)
    assert jobs[3].status == JobState.PENDING
    _wait_state(ws, 3, JobState.COMPLETED)
    # The same command again (completed, running or pending) is a duplicate, whatever the
    # blanks around it; a different command is a new job.
    _add_commands(ws, "echo plain", "  echo plain  ", "echo plain2")
    ws.tick()
    assert len(ws.store.jobs()) == 4
    assert ws.job(4).script == "echo plain2" and ws.job(4).source == "commands.txt:6"
    messages = [msg for _, _, msg in ws.store.events(200)]
    assert "commands.txt:4: duplicate of job 3 (completed), skipped" in messages
    assert "commands.txt:5: duplicate of job 3 (completed), skipped" in messages


def test_commands_file_failed_line_appended_again_runs_again(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = _commands_ws(tmp_path, tmux_socket, gpus=1)
    _add_commands(ws, "echo x >> runs.txt; test -e ok")
    ws.tick()
    _wait_state(ws, 1, JobState.FAILED)
    (tmp_path / "work" / "ok").touch()
    _add_commands(ws, "echo x >> runs.txt; test -e ok")  # identical to a failed job: queued again
    ws.tick()
    _wait_state(ws, 1, JobState.COMPLETED)
    assert len(ws.store.jobs()) == 1
    assert (tmp_path / "work" / "runs.txt").read_text() == "x\nx\n"


def test_commands_file_nul_byte_is_reported_as_file_line(tmp_path: Path, tmux_socket: str) -> None:
    ws = _commands_ws(tmp_path, tmux_socket)
    _add_commands(ws, "echo one > one.txt", "echo \0two", "echo three > three.txt")
    ws.tick()
    errors = [str(e) for e in ws.store.line_errors()]
    assert errors == ["commands.txt:2: a NUL byte cannot be part of a command"]
    assert [j.script for j in ws.store.jobs()] == ["echo one > one.txt", "echo three > three.txt"]
    assert [j.source for j in ws.store.jobs()] == ["commands.txt:1", "commands.txt:3"]
    _wait_state(ws, 2, JobState.COMPLETED)


def test_commands_file_restart_does_not_rerun_lines(tmp_path: Path, tmux_socket: str) -> None:
    ws = _commands_ws(tmp_path, tmux_socket)
    _add_commands(ws, "echo a >> runs.txt", "echo b >> runs.txt")
    ws.tick()
    _wait_state(ws, 1, JobState.COMPLETED)
    _wait_state(ws, 2, JobState.COMPLETED)
    ws.store.close()
    ws2 = make_workspace(tmp_path, tmux_socket, gpus=2, commands_file=ws.settings.commands_file)
    ws2.daemon.reaper.reconcile(time.time())
    assert ws2.daemon.ingest(time.time()) == []
    ws2.tick()
    ws2.tick()
    assert len(ws2.store.jobs()) == 2
    assert sorted((tmp_path / "work" / "runs.txt").read_text().split()) == ["a", "b"]
    _add_commands(ws2, "echo c >> runs.txt")  # still read from where the last run stopped
    ws2.tick()
    _wait_state(ws2, 3, JobState.COMPLETED)
    assert ws2.job(3).source == "commands.txt:3"
    ws2.store.close()


def test_commands_file_appended_lines_reach_the_running_loop(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = _commands_ws(tmp_path, tmux_socket)
    commands = tmp_path / "work" / "commands.txt"
    commands.write_text("echo first > first.txt\n")
    with serving(ws) as store:
        wait_until(lambda: job_status(store, 1) == JobState.COMPLETED)
        assert (tmp_path / "work" / "first.txt").read_text() == "first\n"
        # The fallback re-read is 30 s away (monitor_interval): only the watcher can be this quick.
        with commands.open("a") as f:
            f.write("echo second > second.txt\n")
        wait_until(lambda: job_status(store, 2) == JobState.COMPLETED, timeout=8)
        assert (tmp_path / "work" / "second.txt").read_text() == "second\n"
        with commands.open("a") as f:  # a partial line waits for its newline
            f.write("echo third > third.txt")
        time.sleep(0.3)
        assert store.job(3) is None
        with commands.open("a") as f:
            f.write("\n")
        wait_until(lambda: job_status(store, 3) == JobState.COMPLETED, timeout=8)


def test_commands_file_words_are_never_directives(tmp_path: Path, tmux_socket: str) -> None:
    """A command is the user's shell code: `--gpusched-vram` in it is neither read nor
    removed (it is a jobs-file feature); only `--llm NAME` counts."""
    ws = _commands_ws(tmp_path, tmux_socket, gpus=1)
    write_fake_gpus(tmp_path / "gpus.json", 1, memory_total_mb=GB16)
    _add_commands(
        ws,
        f"python3 {ws.script} --out a.json --gpusched-vram 20 --llm half",
        f"python3 {ws.script} --out b.json --gpusched-vram lots",
    )
    ws.tick()
    first, second = ws.job(1), ws.job(2)
    assert first.status == JobState.RUNNING
    assert (first.vram_mb, first.requirement, first.declared) == (None, 0.5, "")
    assert second.status in (JobState.PENDING, JobState.RUNNING)  # not unschedulable
    _wait_state(ws, 1, JobState.COMPLETED)
    _wait_state(ws, 2, JobState.COMPLETED)
    seen = json.loads((tmp_path / "work" / "a.json").read_text())
    assert seen["argv"] == ["--out", "a.json", "--gpusched-vram", "20", "--llm", "half"]


# ---- script headers --------------------------------------------------------------------------


def test_header_vram_is_stored_and_honoured(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=2)
    write_fake_gpus(tmp_path / "gpus.json", 2, memory_total_mb=GB16)
    big = _script(tmp_path / "big.sh", '{"requirements": {"ram": 1, "vram": 20}}', ARGS_BODY)
    small = _script(
        tmp_path / "small.sh",
        '{"requirements": {"ram": 1, "vram": 8, "ramp_up_time": 60}}',
        ARGS_BODY,
    )
    ws.append(f"0,{big},,--x,", f"0,{small},,--y,")
    ws.tick()
    big_job, small_job = ws.job(1), ws.job(2)
    assert json.loads(big_job.declared) == {"ram_mb": 1024, "vram_mb": 20480}
    assert json.loads(small_job.declared) == {"ram_mb": 1024, "vram_mb": 8192, "ramp_up_s": 60.0}
    assert big_job.status == JobState.UNSCHEDULABLE
    assert "20480 MB" in big_job.reason and f"{GB16} MB" in big_job.reason
    assert small_job.status == JobState.RUNNING
    assert small_job.vram_mb == 8192
    _wait_state(ws, 2, JobState.COMPLETED)
    assert (tmp_path / "args_2.txt").read_text().split() == ["--y", "--cuda", "0"]


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ('{"requirements": {"vram": 4,}}', "requirements header is not valid JSON"),
        ('{"requirements": {"vram": 4, "gpu": 1}}', "unknown requirement 'gpu'"),
        ('{"requirements": {"ram": -2}}', "'ram' must be a positive number of GB, not -2"),
        ('{"requirements": {"ramp_up_time": -1}}', "'ramp_up_time' must be 0 or more seconds"),
        ('{"requirements": {"vram": "4"}}', "'vram' must be a number"),
        ('{"requirements": [4]}', "'requirements' must be an object"),
        ('{"requirements": {"vram": 1e300}}', "'vram' must be at most 1048576 GB"),
    ],
)
def test_bad_header_makes_the_job_unschedulable_with_file_line(
    tmp_path: Path, tmux_socket: str, header: str, message: str
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    script = _script(tmp_path / "bad.sh", header, "touch ran.txt")
    ws.append(f"0,{script},,,")
    ws.tick()
    job = ws.job(1)
    assert job.status == JobState.UNSCHEDULABLE
    assert job.reason.startswith(f"{script}:2: ")
    assert message in job.reason
    ws.tick()
    assert ws.job(1).status == JobState.UNSCHEDULABLE
    assert not (tmp_path / "ran.txt").exists()
    # A new line naming the fixed script reads the header again.
    _script(script, '{"requirements": {"vram": 4}}', "touch ran.txt")
    ws.append(f"0,{script},,--fixed,")
    ws.tick()
    _wait_state(ws, 2, JobState.COMPLETED)
    assert (tmp_path / "ran.txt").exists()


def test_requeue_and_retry_read_a_fixed_header_again(
    tmp_path: Path, tmux_socket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    a = _script(tmp_path / "a.sh", '{"requirements": {"vram": -4}}', "touch ran_a.txt")
    b = _script(tmp_path / "b.sh", '{"requirements": {"vram": -4}}', "touch ran_b.txt")
    ws.append(f"0,{a},,,", f"0,{b},,,")
    ws.tick()
    assert ws.job(1).status == ws.job(2).status == JobState.UNSCHEDULABLE
    _script(a, '{"requirements": {"vram": 4}}', "touch ran_a.txt")
    _script(b, '{"requirements": {"vram": 2}}', "touch ran_b.txt")
    ws.append(f"0,{a},,,")  # the same line again: job 1 is queued again, with the new header
    ws.tick()
    assert ws.job(1).status == JobState.RUNNING
    assert json.loads(ws.job(1).declared) == {"vram_mb": 4096}
    _wait_state(ws, 1, JobState.COMPLETED)
    assert main(["retry", "2", "--state-dir", str(ws.paths.root)]) == 0  # `gpusched retry 2`
    assert "job 2 queued again" in capsys.readouterr().out
    assert json.loads(ws.job(2).declared) == {"vram_mb": 2048}
    _wait_state(ws, 2, JobState.COMPLETED)
    assert (tmp_path / "ran_a.txt").exists() and (tmp_path / "ran_b.txt").exists()


def test_header_on_line_one_without_shebang_and_other_comments(
    tmp_path: Path, tmux_socket: str
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    write_fake_gpus(tmp_path / "gpus.json", 1, memory_total_mb=GB16)
    probe = tmp_path / "probe.py"
    probe.write_text('# {"requirements": {"vram": 8}}\n' + JOB_SCRIPT)
    # Not headers: a JSON comment without "requirements", and a header below line 2.
    other = _script(tmp_path / "other.sh", '{"note": "hello"}', "exit 0")
    late = tmp_path / "late.sh"
    late.write_text('#!/bin/bash\necho\n# {"requirements": {"vram": 99}}\n')
    # A byte-order mark (Windows editors) does not hide a header on line 1.
    bom = tmp_path / "bom.py"
    bom.write_bytes(("\ufeff" + '# {"requirements": {"vram": 2}}\n' + JOB_SCRIPT).encode())
    out = tmp_path / "probe_out.json"
    ws.append(f"0,{probe},,--out {out},", f"0,{other},,,", f"0,{late},,,", f"0,{bom},,,")
    ws.tick()
    assert json.loads(ws.job(1).declared) == {"vram_mb": 8192}
    assert ws.job(1).vram_mb == 8192
    assert ws.job(2).declared == "" and ws.job(3).declared == ""
    assert json.loads(ws.job(4).declared) == {"vram_mb": 2048}
    _wait_state(ws, 1, JobState.COMPLETED)
    assert json.loads(out.read_text())["argv"] == ["--out", str(out), "--cuda", "0"]
    for job_id in (2, 3, 4):
        _wait_state(ws, job_id, JobState.COMPLETED)


def test_huge_declared_memory_does_not_stall_the_scheduler(
    tmp_path: Path, tmux_socket: str
) -> None:
    """1e300 GB used to overflow SQLite's INTEGER when stored: every pass failed, for all jobs."""
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    huge = _script(tmp_path / "huge.sh", '{"requirements": {"vram": 1e300}}', "exit 0")
    ws.append(f"0,{huge},,,", ws.job_line("--gpusched-vram 1e300 --a"), ws.job_line("--b"))
    ws.tick()
    assert ws.job(1).status == ws.job(2).status == JobState.UNSCHEDULABLE
    assert ws.job(1).reason == f"{huge}:2: 'vram' must be at most 1048576 GB, not 1e+300"
    assert ws.job(2).reason == "--gpusched-vram must be at most 1048576 GB, not 1e+300"
    _wait_state(ws, 3, JobState.COMPLETED)


def test_add_directives_are_written_read_and_stripped(
    tmp_path: Path, tmux_socket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    write_fake_gpus(tmp_path / "gpus.json", 1, memory_total_mb=GB16)
    out = tmp_path / "out.json"
    argv = ["add", str(ws.script), "--args", f"--out {out} --name 'a b'", "--vram", "4"]
    argv += ["--ram", "1", "--ramp-up", "5", "--output-file", str(ws.jobs_file)]
    assert main(argv) == 0
    capsys.readouterr()
    line = ws.jobs_file.read_text()
    assert "--gpusched-vram 4 --gpusched-ram 1 --gpusched-ramp-up 5" in line
    ws.daemon.on_path_event(str(ws.jobs_file))
    ws.tick()
    job = ws.job(1)
    assert job.status == JobState.RUNNING
    assert job.args.endswith("--gpusched-vram 4 --gpusched-ram 1 --gpusched-ramp-up 5")
    assert job.vram_mb == 4096
    expected = ["--out", str(out), "--name", "a b", "--cuda", "0"]
    assert job.command == shlex.join(["python3", str(ws.script), *expected])
    _wait_state(ws, 1, JobState.COMPLETED)
    assert json.loads(out.read_text())["argv"] == expected  # the script never sees them


def test_directives_win_over_the_header(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    write_fake_gpus(tmp_path / "gpus.json", 1, memory_total_mb=GB16)
    script = _script(
        tmp_path / "s.sh", '{"requirements": {"vram": 20, "ramp_up_time": 60}}', ARGS_BODY
    )
    ws.append(
        f"0,{script},,--a --gpusched-vram 8,",
        f"0,{script},,--b --gpusched-vram=30,",
        f"0,{script},,--c --gpusched-vram lots,",
    )
    ws.tick()
    first, second, third = ws.job(1), ws.job(2), ws.job(3)
    assert first.status == JobState.RUNNING and first.vram_mb == 8192  # 8 beats the header's 20
    assert second.status == JobState.UNSCHEDULABLE and "30720 MB" in second.reason
    assert third.status == JobState.UNSCHEDULABLE
    assert "--gpusched-vram must be a number, not 'lots'" in third.reason
    _wait_state(ws, 1, JobState.COMPLETED)
    assert (tmp_path / "args_1.txt").read_text().split() == ["--a", "--cuda", "0"]


def test_ramp_up_directive_wins_over_the_header(tmp_path: Path, tmux_socket: str) -> None:
    """Two half-GPU jobs declaring 10 GB each on a 16 GB GPU: while the first one ramps up
    (header: 60 s) its 10 GB stay reserved and the second waits; with `--gpusched-ramp-up 0`
    on the line nothing is reserved and both start at once."""
    ws = make_workspace(tmp_path, tmux_socket, gpus=1)
    write_fake_gpus(tmp_path / "gpus.json", 1, memory_total_mb=GB16)
    body = 'while [ ! -e "go_$1" ]; do sleep 0.05; done'
    script = _script(tmp_path / "s.sh", '{"requirements": {"vram": 10, "ramp_up_time": 60}}', body)
    ws.append(f"0,{script},,a --llm half,", f"0,{script},,b --llm half,")
    ws.tick()
    ws.tick()
    assert ws.job(1).status == JobState.RUNNING
    assert ws.job(2).status == JobState.PENDING
    assert ws.job(2).reason == "needs 0.5 GPU with 10240 MB free: GPU 0 has 6144 MB free"
    (tmp_path / "go_a").touch()
    _wait_state(ws, 2, JobState.RUNNING)
    (tmp_path / "go_b").touch()
    _wait_state(ws, 2, JobState.COMPLETED)
    ws.append(
        f"0,{script},,c --llm half --gpusched-ramp-up 0,",
        f"0,{script},,d --llm half --gpusched-ramp-up=0,",
    )
    ws.tick()
    assert ws.job(3).status == ws.job(4).status == JobState.RUNNING
    assert ws.job(3).gpus == ws.job(4).gpus == (0,)
    (tmp_path / "go_c").touch()
    (tmp_path / "go_d").touch()
    _wait_state(ws, 3, JobState.COMPLETED)
    _wait_state(ws, 4, JobState.COMPLETED)


# ---- log_dir and gpu_ids ---------------------------------------------------------------------


def test_logs_go_to_log_dir(tmp_path: Path, tmux_socket: str) -> None:
    logs = tmp_path / "joblogs" / "nested"
    ws = _commands_ws(tmp_path, tmux_socket, log_dir=logs)
    ws.append(ws.job_line("--name scripted"))
    _add_commands(ws, "echo from-the-commands-file")
    ws.tick()
    for job_id, text in ((1, "started --name scripted"), (2, "from-the-commands-file")):
        job = _wait_state(ws, job_id, JobState.COMPLETED)
        log_path = Path(job.log_path or "")
        assert log_path.parent == logs.resolve()
        wait_until(lambda p=log_path, t=text: t in p.read_text())  # type: ignore[misc]
    assert not list(ws.paths.logs.glob("*.log"))  # nothing in the state directory's logs/


def test_gpu_ids_limit_placements(tmp_path: Path, tmux_socket: str) -> None:
    ws = _commands_ws(tmp_path, tmux_socket, gpus=4, gpu_ids=(2, 3))
    ws.append(
        ws.job_line("--llm one --sleep 30 --a"),
        ws.job_line("--llm one --sleep 30 --b"),
        ws.job_line("--llm one --c", allowed="0"),  # GPU 0 exists but is not ours
        ws.job_line("--llm one --d", allowed="0,3"),
    )
    _add_commands(ws, 'echo "$CUDA_VISIBLE_DEVICES" > cvd.txt # --llm quarter')
    ws.tick()
    jobs = {j.id: j for j in ws.store.jobs()}
    assert {jobs[1].gpus, jobs[2].gpus} == {(2,), (3,)}
    assert jobs[3].status == JobState.UNSCHEDULABLE
    assert "GPU 0" in jobs[3].reason and "GPUs 2-3" in jobs[3].reason  # what it may use
    assert jobs[4].status == JobState.PENDING
    assert "GPU 3" in jobs[4].reason and "GPU 0" not in jobs[4].reason
    assert jobs[5].status == JobState.PENDING  # both usable GPUs are full
    for job in ws.store.jobs([JobState.RUNNING]):
        assert set(job.gpus) <= {2, 3}
    gpus_meta = json.loads(ws.store.meta("gpus") or "[]")
    assert [g["index"] for g in gpus_meta] == [2, 3]  # physical ids, only the allowed ones


def test_gpu_ids_command_sees_a_physical_allowed_gpu(tmp_path: Path, tmux_socket: str) -> None:
    ws = _commands_ws(tmp_path, tmux_socket, gpus=4, gpu_ids=(1, 3))
    _add_commands(ws, 'echo "$CUDA_VISIBLE_DEVICES" > a.txt # --llm half')
    _add_commands(ws, 'echo "$CUDA_VISIBLE_DEVICES" > b.txt # --llm two')
    ws.tick()
    first = _wait_state(ws, 1, JobState.COMPLETED)
    second = _wait_state(ws, 2, JobState.COMPLETED)
    work = tmp_path / "work"
    assert work.joinpath("a.txt").read_text().strip() == str(first.gpus[0])
    assert first.gpus[0] in (1, 3)
    assert second.gpus == (1, 3)
    assert work.joinpath("b.txt").read_text().strip() == "1,3"


def test_gpu_ids_pause_names_physical_ids(tmp_path: Path, tmux_socket: str) -> None:
    ws = make_workspace(tmp_path, tmux_socket, gpus=4, gpu_ids=(2, 3))
    ws.tick()
    assert control.set_paused(ws.store, ws.paths, 3, True) == "GPU 3 paused"
    with pytest.raises(control.ActionError):
        control.set_paused(ws.store, ws.paths, 1, True)
