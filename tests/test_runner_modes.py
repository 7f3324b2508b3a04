"""The whole scheduler in each execution mode: tmux, GNU Screen and direct child processes.

Everything is real: a private tmux server, a private screen socket directory (SCREENDIR),
real child processes, `gpusched start` as a subprocess where its own process matters (signals,
echo to its console, the CLI acting from another process); only the GPUs are fake (JSON).
Jobs wait for a release file, so the set of running jobs is stable while it is compared.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app import proctree
from app.cli import main
from app.control import scheduler_pid
from app.daemon import Daemon
from app.models import Job, JobState
from app.paths import StatePaths
from app.runners.direct import kill_orphan
from app.runners.screen import ScreenRunner, parse_ls
from app.service import build_daemon
from app.store import Store
from tests.helpers import wait_until
from tests.workspace import Workspace, make_workspace

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
needs_screen = pytest.mark.skipif(shutil.which("screen") is None, reason="screen not installed")

#: The job every test runs: says where it runs, waits for its release file, exits as told.
#: Relative paths: a job's cwd is its script's folder, the workspace.
MODE_JOB = """\
import json, os, subprocess, sys, time
args = sys.argv[1:]
def opt(name, default=None):
    return args[args.index(name) + 1] if name in args else default
name = opt("--name", "?")
child = subprocess.Popen(["sleep", "1000"]).pid if "--child" in args else None
with open(f"seen_{name}.tmp", "w") as f:
    json.dump({"cuda": opt("--cuda"), "pid": os.getpid(), "child": child}, f)
os.replace(f"seen_{name}.tmp", f"seen_{name}.json")
print(f"job {name} up on {opt('--cuda')}", flush=True)
while not os.path.exists(f"release_{name}"):
    time.sleep(0.02)
print(f"job {name} done", flush=True)
sys.exit(int(opt("--exit", "0")))
"""


def job_line(
    name: str, model: str, *, priority: int = 0, allowed: str = "", code: int = 0, more: str = ""
) -> str:
    """A jobs-file line for MODE_JOB (`--child`: the job starts a child process too)."""
    args = f"--llm {model} --name {name} --exit {code} {more}".strip()
    return f"{priority},mode_job.py,,{args},{allowed}"


#: Eight jobs on four GPUs (demand 8 GPUs): requirements 0.5/1/2, allowed-GPU restrictions,
#: priorities; distinct exit codes.
PARITY_JOBS = {
    "a": job_line("a", "two", code=0),
    "b": job_line("b", "half", allowed="3", code=3),
    "c": job_line("c", "one", priority=1, code=0),
    "d": job_line("d", "half", code=1),
    "e": job_line("e", "two", priority=2, allowed="0-1", code=0),
    "f": job_line("f", "half", priority=1, allowed="2,3", code=2),
    "g": job_line("g", "one", allowed="1", code=0),
    "h": job_line("h", "half", priority=3, code=4),
}
NAMES = list(PARITY_JOBS)


def release(root: Path, *names: str) -> None:
    for name in names:
        (root / f"release_{name}").touch()


def seen(root: Path, name: str) -> dict[str, Any]:
    path = root / f"seen_{name}.json"
    wait_until(path.exists)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def gone(pid: int) -> bool:
    info = proctree.read_proc(pid)
    return info is None or info.state in ("Z", "X")


def all_gone(*pids: int) -> Callable[[], bool]:
    return lambda: all(gone(pid) for pid in pids)


def screen_ls(socket_dir: str) -> str:
    env = {**os.environ, "SCREENDIR": socket_dir}
    return subprocess.run(
        ["screen", "-ls"], env=env, capture_output=True, text=True, check=False
    ).stdout


@pytest.fixture
def screendir(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A private, short SCREENDIR (socket paths must fit in 107 bytes), set in the environment
    as `make_runner` reads it; every session in it is quit after the test."""
    path = tempfile.mkdtemp(prefix="gs-", dir="/tmp")
    monkeypatch.setenv("SCREENDIR", path)
    try:
        yield path
    finally:
        runner = ScreenRunner(path)
        for name in runner.sessions():
            runner.kill(name, grace_s=1.0)
        env = {**os.environ, "SCREENDIR": path}
        for s in parse_ls(screen_ls(path))[0]:
            subprocess.run(["screen", "-S", s.id, "-X", "quit"], env=env, check=False)
        shutil.rmtree(path, ignore_errors=True)


def prepare(root: Path) -> None:
    (root / "mode_job.py").write_text(MODE_JOB)


def cleanup_jobs(root: Path, paths: StatePaths) -> None:
    """Let every job end on its own, and kill the trees of direct jobs still running."""
    release(root, *NAMES, *(p.name.removeprefix("seen_").removesuffix(".json")
                            for p in root.glob("seen_*.json")))  # fmt: skip
    if not paths.db.exists():
        return
    store = Store(paths.db)
    try:
        for job in store.jobs():
            if job.pid and (job.runner or "").startswith("direct:"):
                kill_orphan(job.pid, paths.run_spec(job.id), grace_s=1.0)
    finally:
        store.close()
    for path in root.glob("seen_*.json"):
        child = json.loads(path.read_text()).get("child")
        if child and not gone(child):
            proctree.kill_tree(child, grace_s=1.0)


# ---- 1. the same job lines, the same placements in every mode ------------------------------


@dataclass
class History:
    #: (pass, job name, GPUs, share) in the order the jobs started
    starts: list[tuple[int, str, tuple[int, ...], float]] = field(default_factory=list)
    #: the GPUs each job's process was told (its rewritten --cuda)
    cuda: dict[str, str] = field(default_factory=dict)
    #: how each job ended: (status, exit code)
    ends: dict[str, tuple[JobState, int | None]] = field(default_factory=dict)


def name_of(job: Job) -> str:
    return job.args.split("--name ")[1].split()[0]


def running_in_start_order(ws: Workspace) -> list[Job]:
    return sorted(ws.store.jobs([JobState.RUNNING]), key=lambda j: (j.started_at or 0.0, j.id))


def run_in_lockstep(workspaces: dict[str, Workspace]) -> dict[str, History]:
    """Feed PARITY_JOBS to every workspace and tick them with one controlled clock.

    Each pass, in every workspace: tick (reap + place), wait until the jobs it started really
    run, then release the first half of the running jobs (in start order) and wait for their
    exit records. The workspaces move together, so a pass costs the slowest mode's time.
    """
    histories = {mode: History() for mode in workspaces}
    for ws in workspaces.values():
        ws.append(*PARITY_JOBS.values())
    now = 1_000_000.0
    for tick in range(20):
        for mode, ws in workspaces.items():
            for placement in ws.daemon.tick(now).started:
                job = ws.job(placement.job_id)
                assert job.runner is not None and job.runner.startswith(f"{mode}:")
                histories[mode].starts.append((tick, name_of(job), placement.gpus, placement.share))
        for mode, ws in workspaces.items():
            cuda = histories[mode].cuda
            for _, name, _, _ in histories[mode].starts:
                if name not in cuda:  # the job really runs, and says where
                    cuda[name] = seen(ws.root, name)["cuda"]
            assert_within_capacity(ws)
        running = {mode: running_in_start_order(ws) for mode, ws in workspaces.items()}
        if not any(running.values()):
            break
        for mode, ws in workspaces.items():
            done = running[mode][: max(1, len(running[mode]) // 2)]
            release(ws.root, *map(name_of, done))
        for mode, ws in workspaces.items():
            for job in running[mode][: max(1, len(running[mode]) // 2)]:
                wait_until(ws.paths.exit_file(job.id).exists)
        now += 10.0
    else:
        raise AssertionError("the jobs did not all end")
    for mode, ws in workspaces.items():
        assert not ws.store.jobs([JobState.PENDING, JobState.RUNNING])
        histories[mode].ends = {name_of(j): (j.status, j.exit_code) for j in ws.store.jobs()}
    return histories


def assert_within_capacity(ws: Workspace) -> None:
    load = [0.0] * 4
    for job in ws.store.jobs([JobState.RUNNING]):
        for gpu in job.gpus:
            load[gpu] += job.share or 0.0
    assert all(x <= 1.0 + 1e-9 for x in load), load


@needs_tmux
@needs_screen
def test_same_job_lines_same_placements_under_tmux_screen_and_direct(
    tmp_path: Path, tmux_socket: str, screendir: str
) -> None:
    workspaces: dict[str, Workspace] = {}
    try:
        for mode in ("tmux", "screen", "direct"):
            ws = make_workspace(tmp_path / mode, tmux_socket, gpus=4, runner=mode)
            workspaces[mode] = ws
            prepare(ws.root)
        assert workspaces["screen"].daemon.runner_id == f"screen:{screendir}"
        histories = run_in_lockstep(workspaces)
    finally:
        for ws in workspaces.values():
            cleanup_jobs(ws.root, ws.paths)
            close = getattr(ws.daemon.runner, "close", None)
            if close is not None:
                close(grace_s=1.0)
            ws.store.close()
    tmux, screen, direct = histories["tmux"], histories["screen"], histories["direct"]
    assert tmux.starts == screen.starts == direct.starts
    assert tmux.cuda == screen.cuda == direct.cuda
    assert tmux.ends == screen.ends == direct.ends
    # What was compared is a real schedule: every job ran once, where it was allowed to,
    # on as many GPUs as its model needs, told its GPUs, and ended with its own exit code.
    starts = tmux.starts
    assert sorted(name for _, name, _, _ in starts) == NAMES
    assert len({tick for tick, *_ in starts}) > 1  # some jobs had to wait for others
    for _, name, gpus, share in starts:
        _, _, _, args, allowed = PARITY_JOBS[name].split(",", 4)
        model = args.split()[1]
        assert len(gpus) == {"half": 1, "one": 1, "two": 2}[model]
        assert share == (0.5 if model == "half" else 1.0)
        if allowed:
            assert set(gpus) <= {"3": {3}, "0-1": {0, 1}, "2,3": {2, 3}, "1": {1}}[allowed]
        assert tmux.cuda[name] == ",".join(map(str, gpus))
    for name, line in PARITY_JOBS.items():
        code = int(line.split("--exit ")[1].split(",")[0])
        status = JobState.COMPLETED if code == 0 else JobState.FAILED
        assert tmux.ends[name] == (status, code)


# ---- gpusched start as a real process -------------------------------------------------------


class Scheduler:
    """`gpusched start` in a subprocess on a workspace; the CLI is called in-process."""

    def __init__(self, ws: Workspace, *flags: str) -> None:
        self.ws = ws
        self.flags = flags
        self.proc: subprocess.Popen[bytes] | None = None
        self.out = ws.root / "scheduler.out"

    def start(self) -> None:
        s = self.ws.settings
        argv = [
            sys.executable, "-m", "app", "start",
            "--jobs-file", str(s.jobs_file), "--llm-config", str(s.llm_config),
            "--state-dir", str(self.ws.paths.root), "--gpu-backend", "fake",
            "--fake-gpus", str(s.fake_gpus), "--ramp-up", "0", "--state-interval", "1",
            "--poll-interval", "0.2",
            *self.flags,
        ]  # fmt: skip
        with self.out.open("ab") as out:
            proc = subprocess.Popen(argv, cwd=self.ws.root, stdout=out, stderr=subprocess.STDOUT)
        self.proc = proc
        wait_until(lambda: scheduler_pid(self.ws.paths) == proc.pid or proc.poll() is not None)
        assert proc.poll() is None, self.out.read_text()

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=15)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=15)

    def cli(self, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
        code = main([*argv, "--state-dir", str(self.ws.paths.root)])
        out, err = capsys.readouterr()
        return code, out + err

    def job(self, job_id: int) -> Job:
        store = Store(self.ws.paths.db)
        try:
            job = store.job(job_id)
        finally:
            store.close()
        assert job is not None
        return job

    def has(self, job_id: int, status: JobState) -> Callable[[], bool]:
        """For wait_until: the job is in the database, in `status`."""

        def check() -> bool:
            store = Store(self.ws.paths.db)
            try:
                job = store.job(job_id)
            finally:
                store.close()
            return job is not None and job.status == status

        return check


@pytest.fixture
def scheduler_for(tmp_path: Path) -> Iterator[Callable[..., Scheduler]]:
    """Makes a Scheduler on a fresh workspace (4 fake GPUs); kills what is left after the test."""
    made: list[Scheduler] = []

    def make(*flags: str) -> Scheduler:
        ws = make_workspace(tmp_path / f"ws{len(made)}", "unused", gpus=4)
        ws.store.close()  # the scheduler process owns the state; tests open it as they need
        prepare(ws.root)
        made.append(Scheduler(ws, *flags))
        return made[-1]

    yield make
    for sched in made:
        sched.kill()
        cleanup_jobs(sched.ws.root, sched.ws.paths)


# ---- 2. screen: sessions, attach command, re-adoption after a restart -------------------------


@needs_screen
def test_start_screen_runs_jobs_in_screen_and_readopts_them_after_a_restart(
    scheduler_for: Callable[..., Scheduler], screendir: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sched = scheduler_for("--screen")
    root = sched.ws.root
    sched.ws.jobs_file.write_text(job_line("s", "half", code=5) + "\n")
    sched.start()
    wait_until(sched.has(1, JobState.RUNNING))
    pid = seen(root, "s")["pid"]
    job = sched.job(1)
    assert job.runner == f"screen:{screendir}"
    assert job.session is not None and job.session.startswith("gpujob_1_0_")
    assert f".{job.session}\t" in screen_ls(screendir)  # in the private socket directory
    code, out = sched.cli(capsys, "sessions")
    assert code == 0
    (line,) = out.splitlines()
    assert line.startswith(f"{job.session}  job 1  GPU 0  ->")
    attach = line.split("->")[1].split()
    # PID.NAME from the private socket directory: exactly this session.
    assert attach[:3] == ["env", f"SCREENDIR={screendir}", "screen"]
    assert attach[3:4] == ["-r"] and attach[4].endswith(f".{job.session}")

    assert sched.stop() == 0
    # Stopped: the job runs on in its session, still `running` in the database.
    state = ScreenRunner(screendir).sessions()[job.session]
    assert state.alive and not gone(pid)
    assert sched.job(1).status == JobState.RUNNING

    sched.start()
    wait_until(lambda: "job 1 re-adopted" in sched.ws.paths.scheduler_log.read_text())
    assert sched.job(1).status == JobState.RUNNING
    assert sched.job(1).session == job.session
    release(root, "s")
    wait_until(sched.has(1, JobState.FAILED))
    ended = sched.job(1)
    assert ended.exit_code == 5
    wait_until(lambda: job.session not in screen_ls(screendir))
    log = Path(ended.log_path or "").read_text(errors="replace")
    assert "job s up on 0" in log and "job s done" in log  # logged by screen, -L -Logfile
    assert sched.stop() == 0


# ---- 3 & 4. direct: echo, logs, CLI kill, attach/sessions, stop, restart ----------------------


def test_start_direct_echoes_logs_kills_from_the_cli_and_stops_children(
    scheduler_for: Callable[..., Scheduler], capsys: pytest.CaptureFixture[str]
) -> None:
    sched = scheduler_for("--direct")
    root = sched.ws.root
    lines = (
        job_line("p", "one", code=7),  # job 1: runs to its end
        job_line("k", "one", more="--child"),  # job 2: killed from the CLI
        job_line("t", "one", more="--child"),  # job 3: running when the scheduler stops
    )
    sched.ws.jobs_file.write_text("".join(line + "\n" for line in lines))
    sched.start()
    for name in "pkt":
        seen(root, name)  # each job runs; its pid is stored once its launch returned
    wait_until(lambda: all(sched.job(i).pid for i in (1, 2, 3)))
    jobs = {name: sched.job(i) for i, name in enumerate("pkt", start=1)}
    seen_k, seen_t = seen(root, "k"), seen(root, "t")
    assert sched.proc is not None
    assert {j.runner for j in jobs.values()} == {f"direct:{sched.proc.pid}"}
    for job in jobs.values():
        assert job.pid is not None and not gone(job.pid)
        assert "wrapper.py" in Path(f"/proc/{job.pid}/cmdline").read_text()

    # Output: echoed on the scheduler's console prefixed by job id, written raw to the log.
    release(root, "p")
    wait_until(sched.has(1, JobState.FAILED))
    assert sched.job(1).exit_code == 7
    p_gpu = sched.job(1).gpus[0]
    wait_until(lambda: "[job 1] job p done" in sched.out.read_text())
    console = sched.out.read_text().splitlines()
    assert console.index(f"[job 1] job p up on {p_gpu}") < console.index("[job 1] job p done")
    assert Path(jobs["p"].log_path or "").read_text() == f"job p up on {p_gpu}\njob p done\n"

    # sessions / attach: a direct job has no terminal; both show `tail -f LOG`.
    code, out = sched.cli(capsys, "sessions")
    assert code == 0
    lines = sorted(out.splitlines())
    assert len(lines) == 2
    for line, name in zip(lines, "kt", strict=True):
        job = jobs[name]
        assert line.startswith(f"{job.session}  job {job.id}  GPU {job.gpus[0]}  ->")
        assert line.split("->")[1].split() == ["tail", "-f", job.log_path]
    attach_out = root / "attach.out"
    with attach_out.open("wb") as f:
        attach = subprocess.Popen(
            [sys.executable, "-m", "app", "attach", "3", "--state-dir", str(sched.ws.paths.root)],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until(lambda: "job t up on" in attach_out.read_text())
        argv = Path(f"/proc/{attach.pid}/cmdline").read_bytes().split(b"\0")[:-1]
        assert argv == [b"tail", b"-f", os.fsencode(jobs["t"].log_path or "")]  # exec'ed
    finally:
        attach.kill()
        attach.wait(timeout=5)

    # `gpusched kill` runs in another process than the scheduler: it kills by stored pid.
    k = jobs["k"]
    assert k.pid is not None
    code, out = sched.cli(capsys, "kill", "2")
    assert code == 0 and f"job 2 killed (session {k.session})" in out
    wait_until(all_gone(k.pid, seen_k["pid"], seen_k["child"]))
    assert sched.job(2).status == JobState.KILLED
    assert not sched.ws.paths.exit_file(2).exists()
    assert sched.job(3).status == JobState.RUNNING  # the others are left alone

    # A normal stop takes the remaining children down with it (tree included).
    t = jobs["t"]
    assert t.pid is not None
    assert sched.stop() == 0
    assert all_gone(t.pid, seen_t["pid"], seen_t["child"])()
    assert "1 direct job(s) stopped with it" in sched.ws.paths.scheduler_log.read_text()
    # The wrapper forwarded the SIGTERM and recorded it: the job ended as 143.
    stopped = sched.job(3)
    assert (stopped.status, stopped.exit_code) == (JobState.FAILED, 143)


@contextlib.contextmanager
def direct_restart(tmp_path: Path) -> Iterator[tuple[Workspace, Daemon, dict[str, Any]]]:
    """A direct job running under a first scheduler, and a second scheduler on the same state.

    The restart is simulated in-process: a new daemon with a new DirectRunner while the first
    runner (never closed, as after a crash) still has the job as its child.
    """
    ws = make_workspace(tmp_path / "ws", "unused", gpus=4, runner="direct")
    prepare(ws.root)
    store = Store(ws.paths.db)
    runners = [ws.daemon.runner]
    try:
        ws.append(job_line("r", "two", more="--child"))
        ws.tick(1000.0)
        info = seen(ws.root, "r")
        job = ws.job(1)
        assert job.status == JobState.RUNNING and job.gpus == (0, 1)
        assert job.pid is not None and not gone(job.pid)
        restarted = build_daemon(ws.settings, ws.paths, store, echo=False)
        runners.append(restarted.runner)
        assert restarted.runner is not ws.daemon.runner
        yield ws, restarted, {**info, "wrapper": job.pid}
    finally:
        cleanup_jobs(ws.root, ws.paths)
        for runner in runners:
            runner.close(grace_s=1.0)  # type: ignore[attr-defined]
        store.close()
        ws.store.close()


def test_direct_restart_marks_the_running_job_lost_and_frees_its_gpus(tmp_path: Path) -> None:
    with direct_restart(tmp_path) as (ws, restarted, pids):
        report = restarted.tick(1010.0)
        assert report.ended == [(1, JobState.LOST)]
        lost = ws.job(1)
        assert lost.status == JobState.LOST
        assert "vanished with no exit record" in lost.reason
        # The new scheduler believes GPUs 0 and 1 free again: a new job is placed there.
        ws.append(job_line("n", "four"))
        restarted.on_path_event(str(ws.jobs_file))  # ws.append tells the first daemon
        (placement,) = restarted.tick(1020.0).started
        assert placement.gpus == (0, 1, 2, 3)
        seen(ws.root, "n")
        # The reaper stopped the orphan (see the next test) through what the database kept.
        wait_until(all_gone(pids["wrapper"], pids["pid"], pids["child"]))


def test_direct_restart_kills_the_orphan_it_marks_lost(tmp_path: Path) -> None:
    with direct_restart(tmp_path) as (_, restarted, pids):
        assert restarted.tick(1010.0).ended == [(1, JobState.LOST)]
        wait_until(all_gone(pids["wrapper"], pids["pid"], pids["child"]), timeout=3.0)
