"""Latency benchmark: submission latency and GPU idle gap, each beside its floor, in one run.

    python bench/latency.py [--runs N] [--chain K] [--out docs/benchmarks.md]

1. Submission latency: a real `gpusched start` subprocess (4 fake GPUs, private tmux socket,
   --ramp-up 0). N jobs are submitted one at a time by appending a line to its jobs file;
   measured are "line written -> job's tmux session exists" (polling `tmux has-session`) and
   "line written -> job's first instruction runs" (the job records time.time() first thing).
   Floor, interleaved sample by sample: `tmux new-session -d` of the same job script on a
   second private socket, measured by the same poller.
2. GPU idle gap: a second scheduler on ONE fake GPU gets K whole-GPU jobs in one write; each
   job records its first and last instruction; gap = start of job i+1 - end of job i.
   Floor: the same script run back to back by `subprocess.run([sys.executable, ...])`.

The Markdown section between the latency markers in --out is replaced; the rest of the file
is left alone (a missing file is created with a short intro). Everything started here (the
schedulers, the tmux servers) is stopped in `finally` blocks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from benchlib import Stats, kill_server, machine_base, stats_ms

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- latency:begin -->"
END = "<!-- latency:end -->"

#: The job: time.time() is its first instruction and the last one before writing the result.
#: argv: OUT SLEEP [--cuda IDS] (gpusched appends --cuda; the script ignores it).
JOB_SCRIPT = """\
import time
t0 = time.time()
import os, sys
if float(sys.argv[2]) > 0:
    time.sleep(float(sys.argv[2]))
t1 = time.time()
with open(sys.argv[1] + ".tmp", "w") as f:
    f.write(repr(t0) + " " + repr(t1))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
"""

#: How long each submission-latency job stays alive: long enough for the poller to see its
#: session whatever the scheduler does; the jobs end and are reaped before the next line.
SUBMIT_JOB_SLEEP = 0.2

INTRO = """\
# Benchmarks

How quickly gpusched reacts, measured against the floor a bare tool achieves on the same machine
in the same run:

- **Submission latency**: from appending a line to the jobs file to the job's tmux session
  existing, and to the job's first instruction running. Floor: `tmux new-session -d` of the
  same job script.
- **GPU idle gap**: how long a GPU stays idle between two queued jobs (end of job i to start of
  job i+1). Floor: the same script run back to back by a plain `subprocess.run` loop.

Reproduce with one command (2 cores and no GPU are enough: GPUs are simulated with
`--gpu-backend fake`, tmux runs on private sockets):

    python bench/latency.py --runs 30

The script rewrites only the section between the `latency` markers below. Every figure is a
median (with p95, min and max) of repeated samples; gpusched and its floor are measured side by
side in the same run (submission samples are interleaved one for one), so compare ratios rather
than absolute numbers across machines. The test suite contains no timed assertions:
`tests/test_bench_smoke.py` (marked `bench`, run with `pytest -m bench`) only checks that the
script runs and writes this section.

"""


# ---- small helpers -------------------------------------------------------------------------


def wait_for(fn: Callable[[], object], timeout: float, what: str, interval: float = 0.002) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)


def has_session(socket: str, name: str) -> bool:
    # `=NAME`: exact match, as gpusched itself does.
    res = subprocess.run(
        ["tmux", "-L", socket, "has-session", "-t", f"={name}"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )
    return res.returncode == 0


def poll_session(socket: str, name: str, timeout: float = 30.0) -> tuple[float, int]:
    """Tight loop of `tmux has-session`: (time.time() when the first success returned, polls)."""
    deadline = time.monotonic() + timeout
    polls = 0
    while True:
        polls += 1
        if has_session(socket, name):
            return time.time(), polls
        if time.monotonic() > deadline:
            raise TimeoutError(f"session {name} on tmux -L {socket} never appeared")


def read_times(path: Path) -> tuple[float, float]:
    first, last = path.read_text().split()
    return float(first), float(last)


def keeper(socket: str) -> None:
    """A long-lived non-job session, so the tmux server is not torn down between jobs."""
    subprocess.run(
        ["tmux", "-L", socket, "new-session", "-d", "-s", "bench_keeper", "sleep", "86400"],
        check=True,
    )


# ---- a scheduler subprocess ------------------------------------------------------------------


class Scheduler:
    """`python -m app start` on fake GPUs and a private tmux socket, in its own directory."""

    def __init__(self, root: Path, gpus: int, env: dict[str, str]) -> None:
        from app.gpus.fake import write_fake_gpus

        self.root = root
        self.socket = f"gpusched_bench_{uuid.uuid4().hex[:10]}"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        root.mkdir(parents=True)
        write_fake_gpus(root / "gpus.json", gpus)
        (root / "llm_config.json").write_text(json.dumps({"default_requirement": 1.0}))
        self.jobs_file = root / "jobs.txt"
        self.jobs_file.write_text("# priority,script_path,conda_env,arguments,allowed_gpus\n")

    def start(self) -> None:
        log = (self.root / "scheduler.out").open("ab")
        with log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "app", "start",
                 "--jobs-file", str(self.jobs_file),
                 "--llm-config", str(self.root / "llm_config.json"),
                 "--state-dir", str(self.root / "state"),
                 "--gpu-backend", "fake", "--fake-gpus", str(self.root / "gpus.json"),
                 "--tmux-socket", self.socket, "--ramp-up", "0"],
                cwd=self.root, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kill_server(self.socket)

    def append(self, lines: Sequence[str]) -> float:
        """Append lines in one write; returns time.time() taken just before the write."""
        data = "".join(line + "\n" for line in lines)
        with self.jobs_file.open("a") as f:
            t = time.time()
            f.write(data)
            f.flush()
        return t

    def check_alive(self) -> None:
        if self.proc is not None and self.proc.poll() is not None:
            out = (self.root / "scheduler.out").read_text(errors="replace")[-2000:]
            raise RuntimeError(f"scheduler exited with {self.proc.returncode}:\n{out}")

    def status(self) -> dict[str, object]:
        res = subprocess.run(
            [sys.executable, "-m", "app", "status", "--json",
             "--state-dir", str(self.root / "state")],
            capture_output=True, text=True, check=True, env=self.env, cwd=self.root,
        )  # fmt: skip
        data: dict[str, object] = json.loads(res.stdout)
        return data

    def jobs_by_out(self) -> dict[str, dict[str, object]]:
        jobs = self.status()["jobs"]
        assert isinstance(jobs, list)
        return {str(j["args"]).split()[0]: j for j in jobs}


def job_line(script: Path, out: Path, sleep: float, allowed: str = "") -> str:
    return f"0,{script},,{out} {sleep:g},{allowed}"


@contextmanager
def running(sched: Scheduler, script: Path) -> Iterator[Scheduler]:
    """Start the scheduler and warm it up with one untimed job (first launch, tmux server)."""
    try:
        keeper(sched.socket)
        warm = sched.root / "warmup.out"
        sched.append([job_line(script, warm, 0)])  # before start: read by the very first pass
        sched.start()
        wait_for(lambda: warm.exists() or sched.check_alive(), 60, "the warm-up job")
        wait_for(lambda: not any_job_session(sched.socket), 30, "the warm-up job to be reaped")
        yield sched
    finally:
        sched.stop()


def any_job_session(socket: str) -> bool:
    res = subprocess.run(
        ["tmux", "-L", socket, "list-sessions", "-F", "#{session_name}"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return any(s.startswith("gpujob_") for s in res.stdout.split())


# ---- benchmark 1: submission latency ----------------------------------------------------------


@dataclass
class SubmitResult:
    line_to_session: list[float]
    line_to_first: list[float]
    floor_to_session: list[float]
    floor_to_first: list[float]
    line_to_pass: list[float]  # line written -> the scheduler pass that launched it began
    pass_to_session: list[float]
    session_to_first: list[float]
    floor_session_to_first: list[float]
    polls: list[int]


def bench_submission(work: Path, script: Path, runs: int, env: dict[str, str]) -> SubmitResult:
    res = SubmitResult([], [], [], [], [], [], [], [], [])
    sched = Scheduler(work / "submit", 4, env)
    floor_socket = f"gpusched_bench_floor_{uuid.uuid4().hex[:10]}"
    outs: list[tuple[Path, float]] = []
    try:
        keeper(floor_socket)
        with running(sched, script):
            # The session name (gpujob_<id>_<gpus>_<stem>) is predicted so that one poll is one
            # `has-session` call, as for the floor: ids are consecutive (the warm-up job was 1)
            # and every job is pinned to GPU 0, which is free again before each line.
            next_id = 2
            for i in range(runs):
                # gpusched: line -> session -> first instruction.
                out = work / "submit" / f"job_{i}.out"
                name = f"gpujob_{next_id}_0_{script.stem}"
                t_line = sched.append([job_line(script, out, SUBMIT_JOB_SLEEP, allowed="0")])
                t_sess, polls = poll_session(sched.socket, name)
                res.line_to_session.append(t_sess - t_line)
                res.polls.append(polls)
                wait_for(out.exists, 30, f"job {i} to run")
                first, _ = read_times(out)
                res.line_to_first.append(first - t_line)
                res.session_to_first.append(first - t_sess)
                outs.append((out, t_line))
                wait_for(lambda: not any_job_session(sched.socket), 30, f"job {i} to be reaped")
                next_id += 1

                # Floor: tmux new-session of the same script, seen by the same poller.
                fout = work / "submit" / f"floor_{i}.out"
                fname = f"floor_{i}"
                argv = [sys.executable, str(script), str(fout), f"{SUBMIT_JOB_SLEEP:g}"]
                t0 = time.time()
                proc = subprocess.Popen(
                    ["tmux", "-L", floor_socket, "new-session", "-d", "-s", fname, *argv]
                )
                t_sess, _ = poll_session(floor_socket, fname)
                proc.wait()
                res.floor_to_session.append(t_sess - t0)
                wait_for(fout.exists, 30, f"floor job {i} to run")
                first, _ = read_times(fout)
                res.floor_to_first.append(first - t0)
                res.floor_session_to_first.append(first - t_sess)
                wait_for(lambda n=fname: not has_session(floor_socket, n), 30, "floor session end")
            jobs = sched.jobs_by_out()
            for (out, t_line), to_session in zip(outs, res.line_to_session, strict=True):
                started = float(jobs[str(out)]["started_at"])  # type: ignore[arg-type]
                res.line_to_pass.append(started - t_line)
                res.pass_to_session.append(to_session - (started - t_line))
    finally:
        kill_server(floor_socket)
    return res


# ---- benchmark 2: GPU idle gap ----------------------------------------------------------------


@dataclass
class GapResult:
    gaps: list[float]
    floor_gaps: list[float]
    end_to_record: list[float]  # job's last instruction -> wrapper's recorded end
    record_to_pass: list[float]  # wrapper's recorded end -> the pass that launched the next job
    pass_to_first: list[float]  # that pass began -> next job's first instruction


def bench_gap(work: Path, script: Path, chain: int, env: dict[str, str]) -> GapResult:
    sched = Scheduler(work / "gap", 1, env)
    with running(sched, script):
        outs = [work / "gap" / f"chain_{i:03d}.out" for i in range(chain)]
        sched.append([job_line(script, out, 0) for out in outs])
        for out in outs:
            wait_for(out.exists, 60, f"{out.name}", interval=0.05)
        wait_for(lambda: not any_job_session(sched.socket), 30, "the chain to be reaped", 0.05)
        jobs = sched.jobs_by_out()
    runs = sorted((read_times(out), jobs[str(out)]) for out in outs)
    result = GapResult([], [], [], [], [])
    for ((_, end), job), ((start, _), nxt) in itertools.pairwise(runs):
        result.gaps.append(start - end)
        ended = float(job["ended_at"])  # type: ignore[arg-type]
        started = float(nxt["started_at"])  # type: ignore[arg-type]
        result.end_to_record.append(ended - end)
        result.record_to_pass.append(started - ended)
        result.pass_to_first.append(start - started)

    fouts = [work / "gap" / f"floor_{i:03d}.out" for i in range(chain)]
    for fout in fouts:
        subprocess.run([sys.executable, str(script), str(fout), "0"], check=True)
    times = [read_times(f) for f in fouts]
    result.floor_gaps = [b[0] - a[1] for a, b in itertools.pairwise(times)]
    return result


# ---- context: what the numbers are made of ----------------------------------------------------

#: What app/wrapper.py imports before it starts the job.
WRAPPER_IMPORTS = "import contextlib, json, os, signal, subprocess, sys, tempfile, time, pathlib"


@dataclass
class Context:
    python_start: list[float]  # sys.executable: process start -> first instruction
    shim_start: list[float]  # `python3` as found on the caller's PATH, when not sys.executable
    shim_path: str
    has_session_call: list[float]
    wrapper_start: list[float]  # `python -I` + the wrapper's imports: spawn -> exit
    wrapper_start_nosite: list[float]  # the same with -S (no site-packages, no .pth hooks)


def measure_context(work: Path, script: Path, original_path: str, samples: int) -> Context:
    def first_instruction(cmd: str, tag: str) -> list[float]:
        out: list[float] = []
        for i in range(samples):
            f = work / f"ctx_{tag}_{i}.out"
            t0 = time.time()
            subprocess.run([cmd, str(script), str(f), "0"], check=True)
            out.append(read_times(f)[0] - t0)
        return out

    def spawn_to_exit(argv: list[str]) -> list[float]:
        out: list[float] = []
        for _ in range(samples):
            t0 = time.perf_counter()
            subprocess.run(argv, check=True)
            out.append(time.perf_counter() - t0)
        return out

    ctx = Context(first_instruction(sys.executable, "py"), [], "", [], [], [])
    ctx.wrapper_start = spawn_to_exit([sys.executable, "-I", "-c", WRAPPER_IMPORTS])
    ctx.wrapper_start_nosite = spawn_to_exit([sys.executable, "-I", "-S", "-c", WRAPPER_IMPORTS])
    # The `python3` a scheduler gets when its PATH lacks the interpreter's own directory (e.g.
    # `gpusched start` via its entry point from a pyenv shell: then PATH starts with shims).
    own_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(d for d in original_path.split(os.pathsep) if d and d != own_dir)
    found = shutil.which("python3", path=path)
    if found and Path(found).resolve() != Path(sys.executable).resolve():
        ctx.shim_path = found
        ctx.shim_start = first_instruction(found, "shim")
    socket = f"gpusched_bench_ctx_{uuid.uuid4().hex[:10]}"
    try:
        keeper(socket)
        for _ in range(samples):
            t0 = time.perf_counter()
            has_session(socket, "bench_keeper")
            ctx.has_session_call.append(time.perf_counter() - t0)
    finally:
        kill_server(socket)
    return ctx


# ---- report -----------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    tmux = subprocess.run(["tmux", "-V"], capture_output=True, text=True, check=False)
    return {
        **machine_base(),
        "Python": f"{platform.python_version()} ({sys.executable})",
        "tmux": tmux.stdout.strip() or "unknown",
    }


def row(label: str, s: Stats, floor: Stats | None = None) -> str:
    ratio = f"{s.median / floor.median:.2f}x" if floor and floor.median > 0 else "-"
    return (
        f"| {label} | {s.n} | {s.median:.1f} | {s.p95:.1f} | {s.low:.1f} | {s.high:.1f} | {ratio} |"
    )


HEADER = (
    "| measurement | n | median ms | p95 ms | min ms | max ms | ratio to floor (medians) |\n"
    "|---|---:|---:|---:|---:|---:|---:|"
)


def render(
    sub: SubmitResult, gap: GapResult, ctx: Context, runs: int, chain: int, took: float
) -> str:
    m = machine()
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ls, lf = stats_ms(sub.line_to_session), stats_ms(sub.line_to_first)
    fs, ff = stats_ms(sub.floor_to_session), stats_ms(sub.floor_to_first)
    g, fg = stats_ms(gap.gaps), stats_ms(gap.floor_gaps)
    py = stats_ms(ctx.python_start)
    poll = stats_ms(ctx.has_session_call)
    wake = stats_ms(sub.line_to_pass)
    pass_sess = stats_ms(sub.pass_to_session)
    s2f, fs2f = stats_ms(sub.session_to_first), stats_ms(sub.floor_session_to_first)
    e2r, r2p, p2f = (stats_ms(gap.end_to_record), stats_ms(gap.record_to_pass),
                     stats_ms(gap.pass_to_first))  # fmt: skip
    lines = [
        BEGIN,
        "## Latency",
        "",
        f"Generated by `python bench/latency.py --runs {runs} --chain {chain}` on {when} "
        f"({took:.0f} s).",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in m.items()) + ".",
        "",
        "### Submission latency",
        "",
        f"A `gpusched start` subprocess on 4 fake GPUs (`--ramp-up 0`, private tmux socket) gets "
        f"{runs} jobs one at a time; each line is appended only after the previous job ran and "
        'was reaped. The clock starts just before the write+flush of the line. "Session exists" '
        "is when the first successful `tmux has-session -t =NAME` of a tight polling loop "
        f"returned (one call takes {poll.median:.1f} ms median, the resolution of that column); "
        '"first instruction" is the job\'s own `time.time()`, its first statement. The floor, '
        "interleaved sample by sample, runs the same script with `tmux new-session -d` on a second "
        "private socket (clock started just before spawning tmux, same poller). Both tmux servers "
        "are kept alive by an idle session, as a user's server usually is.",
        "",
        HEADER,
        row("gpusched: line → session exists", ls, fs),
        row("floor: `tmux new-session` → session exists", fs),
        row("gpusched: line → job's first instruction", lf, ff),
        row("floor: `tmux new-session` → first instruction", ff),
        "",
        f"Where gpusched's time goes (medians): line → the scheduler pass that launched the job "
        f"begins {wake.median:.1f} ms (watchdog/inotify wake-up); pass begins → session exists "
        f"{pass_sess.median:.1f} ms (probe, ingest, SQLite, allocation, one "
        f"`tmux new-session` call, poll resolution); session exists → first instruction "
        f"{s2f.median:.1f} ms (wrapper start-up + job start-up; floor: {fs2f.median:.1f} ms, job "
        "start-up only).",
        "",
        "### GPU idle gap",
        "",
        f"A second scheduler on ONE fake GPU gets {chain} whole-GPU jobs in one write; each job "
        "records its first and last instruction, and the gap is start of job i+1 − end of job i "
        f"({chain - 1} gaps). The floor runs the same script back to back with "
        "`subprocess.run([sys.executable, script, ...])`.",
        "",
        HEADER,
        row("gpusched: job i ends → job i+1 starts", g, fg),
        row("floor: `subprocess.run` loop", fg),
        "",
        f"gpusched's overhead over the floor: {g.median - fg.median:.1f} ms per job (medians). "
        f"Where the gap goes (medians): job's last instruction → its wrapper records the exit "
        f"{e2r.median:.1f} ms (interpreter shutdown, wrapper's `wait`); recorded exit → the "
        f"scheduler pass that launches the next job begins {r2p.median:.1f} ms (exit record "
        f"written with fsync + rename, inotify wake-up); that pass → next job's first "
        f"instruction {p2f.median:.1f} ms (reap + `kill-session`, allocation, SQLite, tmux "
        "launch, wrapper start-up, job start-up).",
        "",
        "### What dominates",
        "",
        f"- Python start-up: `{Path(sys.executable).name}` takes {py.median:.1f} ms median "
        f"(p95 {py.p95:.1f}) from spawn to the first instruction here. A gpusched job pays it "
        "twice in a row (the in-pane wrapper `app/wrapper.py`, then the job), the floor once: "
        f"one extra start-up against {g.median - fg.median:.1f} ms of idle-gap overhead and "
        f"{s2f.median - fs2f.median:.1f} ms more from session to first instruction.",
        f"- The wrapper's own start-up (spawn to exit) takes "
        f"{stats_ms(ctx.wrapper_start).median:.1f} ms with `python -I`, "
        f"{stats_ms(ctx.wrapper_start_nosite).median:.1f} ms with `-I -S`, which skips `site` "
        "(site-packages and its `.pth` start-up hooks, such as an editable install's finder); "
        "the stdlib-only wrapper is started with `-I -S`.",
        "- tmux: every `tmux` call forks a client that connects to the server (a few ms each, "
        "see the poll cost above). A launch is one: `new-session -P` (with its chained "
        "`set-option`s and `pipe-pane`) creates the session and returns the pane's pid; in "
        "the idle gap the reaper's `kill-session` of the finished job comes first. "
        "Profiling a scheduler pass in-process (cProfile around `Daemon.tick`) puts most of "
        "its time in these tmux calls; SQLite, "
        "allocation and the fsync'd launch spec take a few ms.",
        "- Wake-up: the jobs file and `<state>/exits/` are watched (watchdog/inotify), so the "
        "scheduler never waits for its fallback periods; the wake-up itself is a few ms.",
    ]
    if ctx.shim_start:
        shim = stats_ms(ctx.shim_start)
        lines.append(
            f"- Beware PATH shims: `.py` jobs without a conda env run `python3` from the "
            f"scheduler's PATH. Without the interpreter's own directory on PATH that is "
            f"`{ctx.shim_path}` here, which takes {shim.median:.1f} ms (vs {py.median:.1f} ms "
            "direct) to reach the first instruction. The bench puts the interpreter's directory "
            "first on the scheduler's PATH so both sides run the same interpreter; a scheduler "
            f"started from a shimmed shell adds about {shim.median - py.median:.0f} ms to every "
            "job start."
        )
    lines += ["", END]
    return "\n".join(lines)


def write_section(out: Path, section: str) -> None:
    benchlib.write_section(out, section, BEGIN, END, INTRO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=30, help="submission samples (30)")
    parser.add_argument("--chain", type=int, default=20, help="jobs in the idle-gap chain (20)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.chain < 2:
        parser.error("--runs must be >= 1 and --chain >= 2")
    if shutil.which("tmux") is None:
        parser.error("tmux is not installed")
    sys.path.insert(0, str(REPO))

    original_path = os.environ.get("PATH", "")
    env = {k: v for k, v in os.environ.items() if k not in ("TMUX", "TMUX_PANE")}
    # Jobs run `python3` from the scheduler's PATH: make that the interpreter the floor uses.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{original_path}"
    env.pop("GPUSCHED_STATE_DIR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)

    work = Path(tempfile.mkdtemp(prefix="gpusched_bench_"))
    started = time.monotonic()
    try:
        script = work / "job.py"
        script.write_text(JOB_SCRIPT)
        print(f"workspace {work}", flush=True)
        ctx = measure_context(work, script, original_path, samples=max(5, min(args.runs, 20)))
        print("submission latency ...", flush=True)
        sub = bench_submission(work, script, args.runs, env)
        print("GPU idle gap ...", flush=True)
        gap = bench_gap(work, script, args.chain, env)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    section = render(sub, gap, ctx, args.runs, args.chain, time.monotonic() - started)
    write_section(args.out, section)
    print(section)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
