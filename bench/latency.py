"""Latency benchmark: submission latency beside its floor (`tmux new-session`), in one run.

    python bench/latency.py [--runs N] [--out docs/benchmarks.md]

1. Submission latency: a real `gpusched start` subprocess (4 fake GPUs, private tmux socket,
   --ramp-up 0). N jobs are submitted one at a time by appending a line to its jobs file;
   measured are "line written -> job's tmux session exists" (polling `tmux has-session`) and
   "line written -> job's first instruction runs" (the job records time.time() first thing).
   Floor, interleaved sample by sample: `tmux new-session -d` of the same job script on a
   second private socket, measured by the same poller.
The GPU idle gap (a job ends -> the next starts), with the peers, is bench/idlegap.py.

The Markdown section between the latency markers in --out is replaced; the rest of the file
is left alone (a missing file is created with a short intro). Everything started here (the
schedulers, the tmux servers) is stopped in `finally` blocks.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
from benchlib import (
    JOB_SCRIPT,
    Scheduler,
    Stats,
    bench_env,
    has_session,
    job_line,
    keeper,
    kill_server,
    read_times,
    running,
    stats_ms,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- latency:begin -->"
END = "<!-- latency:end -->"

#: How long each submission-latency job stays alive: long enough for the poller to see its
#: session whatever the scheduler does; the jobs end and are reaped before the next line.
SUBMIT_JOB_SLEEP = 0.2

# ---- small helpers -------------------------------------------------------------------------


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
                wait_for(lambda n=i: sched.settled(n + 2), 30, f"job {i} to be reaped", 0.01)
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


# ---- context: what the numbers are made of ----------------------------------------------------

#: The in-session wrapper; run without arguments it starts, prints its usage and exits.
WRAPPER = REPO / "app" / "wrapper.py"


@dataclass
class Context:
    python_start: list[float]  # sys.executable: process start -> first instruction
    shim_start: list[float]  # `python3` as found on the caller's PATH, when not sys.executable
    shim_path: str
    has_session_call: list[float]
    wrapper_start: list[float]  # `python -I wrapper.py` (usage, exit): spawn -> exit
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
            subprocess.run(argv, check=False, stderr=subprocess.DEVNULL)
            out.append(time.perf_counter() - t0)
        return out

    ctx = Context(first_instruction(sys.executable, "py"), [], "", [], [], [])
    ctx.wrapper_start = spawn_to_exit([sys.executable, "-I", str(WRAPPER)])
    ctx.wrapper_start_nosite = spawn_to_exit([sys.executable, "-I", "-S", str(WRAPPER)])
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


def row(label: str, s: Stats, floor: Stats | None = None) -> str:
    ratio = f"{s.median / floor.median:.2f}x" if floor and floor.median > 0 else "-"
    return (
        f"| {label} | {s.n} | {s.median:.1f} | {s.p95:.1f} | {s.low:.1f} | {s.high:.1f} | {ratio} |"
    )


HEADER = (
    "| measurement | n | median ms | p95 ms | min ms | max ms | ratio to floor (medians) |\n"
    "|---|---:|---:|---:|---:|---:|---:|"
)


def render(sub: SubmitResult, ctx: Context, runs: int, took: float, load: str = "") -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ls, lf = stats_ms(sub.line_to_session), stats_ms(sub.line_to_first)
    fs, ff = stats_ms(sub.floor_to_session), stats_ms(sub.floor_to_first)
    py = stats_ms(ctx.python_start)
    poll = stats_ms(ctx.has_session_call)
    wake = stats_ms(sub.line_to_pass)
    pass_sess = stats_ms(sub.pass_to_session)
    s2f, fs2f = stats_ms(sub.session_to_first), stats_ms(sub.floor_session_to_first)
    ratio = ls.median / fs.median
    lines = [
        BEGIN,
        "## Submission latency",
        "",
        f"Generated by `python bench/latency.py --runs {runs}` on {when} ({took:.0f} s).",
        "",
        "Machine: " + benchlib.machine_line() + ".",
        "",
        load,
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
        f"Target: line → session exists ≤ 2× the floor (medians): {ratio:.2f}x, "
        + ("met." if ratio <= 2 else "missed."),
        "",
        f"Where gpusched's time goes (medians): line → the scheduler pass that launched the job "
        f"begins {wake.median:.1f} ms (watchdog/inotify wake-up); pass begins → session exists "
        f"{pass_sess.median:.1f} ms (probe, ingest, SQLite, allocation, one tmux call, poll "
        f"resolution); session exists → first instruction {s2f.median:.1f} ms (job start-up, "
        f"plus the wrapper's when no spare was waiting; floor: {fs2f.median:.1f} ms, job "
        "start-up only).",
        "",
        "### What dominates",
        "",
        f"- Python start-up: `{Path(sys.executable).name}` takes {py.median:.1f} ms median "
        f"(p95 {py.p95:.1f}) from spawn to the first instruction here. The in-session wrapper "
        "(`app/wrapper.py`, which records the job's exit) is a Python process too: started "
        f"with `-I -S` it takes {stats_ms(ctx.wrapper_start_nosite).median:.1f} ms to start "
        f"(spawn to exit; {stats_ms(ctx.wrapper_start).median:.1f} ms with `site`), which is "
        "why the tmux and direct runners keep a spare wrapper waiting after each launch "
        "(`app/runners/spare.py`): a launch renames the spare's session (tmux) or writes to "
        "its stdin (direct) instead of starting one. The wrapper imports nothing before it "
        "forks the job (the C parts of `json` and `signal` only).",
        "- tmux: every `tmux` call forks a client that connects to the server (a few ms each, "
        "see the poll cost above). A launch is one call: `rename-session` of the spare (or "
        "`new-session -P` when none is ready), with its chained `set-option`s and "
        "`pipe-pane`.",
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
    benchlib.write_section(out, section, BEGIN, END, benchlib.INTRO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=30, help="submission samples (30)")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args(argv)
    if args.runs < 1:
        parser.error("--runs must be >= 1")
    if shutil.which("tmux") is None:
        parser.error("tmux is not installed")
    sys.path.insert(0, str(REPO))
    env, original_path = bench_env(REPO)
    work = Path(tempfile.mkdtemp(prefix="gpusched_bench_"))
    started, busy = time.monotonic(), benchlib.Busy()
    try:
        script = work / "job.py"
        script.write_text(JOB_SCRIPT)
        print(f"workspace {work}", flush=True)
        ctx = measure_context(work, script, original_path, samples=max(5, min(args.runs, 20)))
        print("submission latency ...", flush=True)
        sub = bench_submission(work, script, args.runs, env)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    section = render(sub, ctx, args.runs, time.monotonic() - started, busy.line())
    write_section(args.out, section)
    print(section)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
