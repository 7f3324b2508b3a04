"""Throughput and per-job overhead: N short jobs on 4 fake GPUs, end to end; gpusched and peers.

    python bench/throughput.py [--jobs N] [--gpus G] [--repeats R] [--out docs/benchmarks.md]

Every tool runs the same N jobs on G fake GPUs: a job is `bash job.sh MARKER`, which creates
its marker file (`: > "$1"`) and exits, so each tool's own per-job cost is what separates
them. Tools: the floor (one plain `sh` loop per GPU, jobs dealt round robin), gpusched with
each runner (`gpusched start --runner tmux|screen|direct`, all N lines appended in one write),
simple_gpu_scheduler (`--gpus 0 1 2 3`, the N commands on stdin) and task-spooler (one queue
per GPU, jobs dealt round robin, submitted one `tsp -n` call each). End to end = from just
before the first job is handed over to the newest marker's mtime.

CPU: "scheduler" is the scheduling process's own user+system time over the run (gpusched's
`start` process; simple_gpu_scheduler's process; the tsp queue servers; the floor's shells).
"everything" is the CPU time of every process the tool ran, the jobs included, from its start
to its stop: this process makes itself a child subreaper, so daemonized servers (tmux, screen,
tsp and its per-job clients) are reaped here and their time reaches RUSAGE_CHILDREN. The
section between the throughput markers in --out is replaced; everything started is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import peers
from benchlib import JOB_SCRIPT, Scheduler, bench_env, proc_cpu, running, wait_for

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- throughput:begin -->"
END = "<!-- throughput:end -->"
RUNNERS = ("tmux", "screen", "direct")
JOB_SH = ': > "$1"\n'


@dataclass
class Sample:
    wall_s: float
    own_cpu_s: float | None
    all_cpu_s: float


@dataclass
class Tool:
    key: str
    label: str
    samples: list[Sample] = field(default_factory=list)
    note: str = ""


def markers_done(done: Path, n: int) -> Callable[[], bool]:
    def check() -> bool:
        with os.scandir(done) as it:
            return sum(1 for _ in it) >= n

    return check


def newest_mtime(done: Path) -> float:
    with os.scandir(done) as it:
        return max(e.stat().st_mtime_ns for e in it) / 1e9


def drain_orphans(timeout: float = 10.0) -> None:
    """Reap every exited descendant adopted by this subreaper, until none is left (or
    `timeout`: a daemon that is still shutting down is reaped by a later call)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        peers.reap_orphans()
        try:
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return  # no child left at all
        time.sleep(0.02)


def run_gpusched(
    runner: str, work: Path, job_sh: Path, warm: Path, n: int, gpus: int, env: dict[str, str]
) -> Sample:
    before = peers.children_cpu_s()
    done = work / "done"
    done.mkdir(parents=True)
    sched = Scheduler(work / "sched", gpus, env, runner=runner)
    lines = [f"0,{job_sh},,{done / f'j{i:05d}'}," for i in range(n)]
    with running(sched, warm):
        assert sched.proc is not None
        cpu0 = proc_cpu(sched.proc.pid)
        t0 = sched.append(lines)
        wait_for(markers_done(done, n), 120 + n, f"gpusched {runner}'s jobs", 0.05)
        end = newest_mtime(done)
        wait_for(lambda: sched.settled(n + 1), 120, "the jobs to be reaped", 0.05)
        cpu1 = proc_cpu(sched.proc.pid)
    drain_orphans()
    own = cpu1.own_s - cpu0.own_s if cpu0 and cpu1 else None
    return Sample(end - t0, own, peers.children_cpu_s() - before)


def run_peer(
    make: Callable[[Path], peers.PeerTool], work: Path, job_sh: Path, n: int, gpus: int
) -> Sample:
    before = peers.children_cpu_s()
    done = work / "done"
    done.mkdir(parents=True)
    bash = shutil.which("bash") or "/bin/bash"
    commands = [[bash, str(job_sh), str(done / f"j{i:05d}")] for i in range(n)]
    tool = make(work)
    run = tool.run(commands, list(range(gpus)), markers_done(done, n), 120.0 + n)
    end = newest_mtime(done)
    drain_orphans()
    return Sample(end - run.t_submit, run.own_cpu_s, peers.children_cpu_s() - before)


def _sgs(peer: peers.Peer, _work: Path) -> peers.PeerTool:
    return peers.SimpleGpuScheduler(peer)


def measure(
    work: Path, n: int, gpus: int, repeats: int, runners: Sequence[str], install: bool
) -> tuple[list[Tool], dict[str, peers.Peer], bool]:
    subreaper = peers.become_subreaper()
    env, _ = bench_env(REPO)
    job_sh = work / "job.sh"
    job_sh.write_text(JOB_SH)
    warm = work / "warm.py"
    warm.write_text(JOB_SCRIPT)
    found = peers.setup_peers(install)
    tools: list[Tool] = [Tool("floor", "floor: plain `sh` loop per GPU")]
    tools += [Tool(r, f"gpusched --runner {r}") for r in runners]
    tools += [Tool(k, p.name, note="" if p.available else f"skipped: {p.note}")
              for k, p in found.items()]  # fmt: skip
    for tool in tools:
        if tool.key in RUNNERS and shutil.which(tool.key) is None and tool.key != "direct":
            tool.note = f"skipped: {tool.key} is not installed"
    for r in range(repeats):
        order = tools[r % len(tools) :] + tools[: r % len(tools)]
        for tool in order:
            if tool.note:
                continue
            print(f"throughput {r + 1}/{repeats}: {tool.label} ({n} jobs) ...", flush=True)
            where = work / f"{tool.key}_{r}"
            if tool.key in RUNNERS:
                sample = run_gpusched(tool.key, where, job_sh, warm, n, gpus, env)
            elif tool.key == "floor":
                sample = run_peer(peers.ShellLoop, where, job_sh, n, gpus)
            else:
                make: Callable[[Path], peers.PeerTool] = peers.TaskSpooler
                if tool.key == "sgs":
                    make = functools.partial(_sgs, found["sgs"])
                try:
                    sample = run_peer(make, where, job_sh, n, gpus)
                except Exception as e:  # a peer that breaks is reported, not fatal
                    tool.note, tool.samples = f"failed: {e}", []
                    print(f"{tool.key} failed: {e}", flush=True)
                    continue
            tool.samples.append(sample)
            shutil.rmtree(where, ignore_errors=True)
    return tools, found, subreaper


# ---- report -----------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    return statistics.median(values)


def render(
    tools: list[Tool],
    found: dict[str, peers.Peer],
    args: argparse.Namespace,
    subreaper: bool,
    took: float,
    load: str = "",
) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    n, g = args.jobs, args.gpus
    floor = next(t for t in tools if t.key == "floor")
    f_wall = _median([s.wall_s for s in floor.samples])
    f_all = _median([s.all_cpu_s for s in floor.samples])
    rows = []
    for t in tools:
        if not t.samples:
            rows.append(f"| {t.label} | - | - | - | - | - | - | - | {t.note or 'not run'} |")
            continue
        wall = _median([s.wall_s for s in t.samples])
        own_values = [s.own_cpu_s for s in t.samples if s.own_cpu_s is not None]
        own = f"{_median(own_values) * 1000 / n:.2f}" if own_values else "-"
        all_cpu = _median([s.all_cpu_s for s in t.samples])
        floor_row = t.key == "floor"
        lost = "-" if floor_row else f"{(wall - f_wall) * g / n * 1000:+.1f}"
        extra = "-" if floor_row else f"{(all_cpu - f_all) * 1000 / n:+.1f}"
        spread = ""
        if len(t.samples) > 1:
            spread = (
                f" ({min(s.wall_s for s in t.samples):.2f}–{max(s.wall_s for s in t.samples):.2f})"
            )
        rows.append(
            f"| {t.label} | {len(t.samples)} | {wall:.2f}{spread} | {n / wall:.0f} "
            f"| {'-' if floor_row else f'{wall / f_wall:.2f}x'} | {lost} | {own} "
            f"| {all_cpu * 1000 / n:.1f} | {extra} |"
        )
    lines = [
        BEGIN,
        "## Throughput and per-job overhead",
        "",
        f"Generated by `python bench/throughput.py --jobs {n} --gpus {g} --repeats "
        f"{args.repeats}` on {when} ({took:.0f} s).",
        "",
        "Machine: " + benchlib.machine_line() + ".",
        "",
        load,
        "",
        "Peers: "
        + "; ".join(f"{p.name} {p.version or '-'} ({p.note})" for p in found.values())
        + ".",
        "",
        f"{n} jobs on {g} fake GPUs, end to end. A job is `bash job.sh MARKER`, which creates its "
        "marker file and exits (about a millisecond of work), so what separates the tools is "
        "their own per-job cost. The floor runs one plain `sh` loop per GPU (jobs dealt round "
        "robin). gpusched: a `gpusched start` subprocess per runner (4 fake GPUs, "
        "`--ramp-up 0`, private tmux socket / screen directory), warmed up by one job, then all "
        "lines appended in one write (any GPU). simple_gpu_scheduler: "
        "`--gpus 0 1 2 3`, the commands on its stdin. task-spooler: one queue (one slot) per "
        "GPU, jobs dealt round robin, one `tsp -n` call per job (its submission time counts). "
        "End to end: from just before the first job is handed over to the newest marker's "
        f"mtime; median of {args.repeats} run(s) per tool (min–max in brackets when several), "
        "tools rotated between repeats. The CPU figures are per job over the whole run.",
        "",
        "| tool | runs | end to end, s | jobs/s | vs floor | GPU time lost per job, ms "
        "| scheduler CPU ms/job | all CPU ms/job | overhead CPU ms/job |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        f"GPU time lost per job = (end to end − the floor's) × {g} GPUs / {n} jobs. Scheduler "
        "CPU: the scheduling process's own user+system time from the first submission to the "
        "last job reaped (gpusched's `start` process with all its threads, not its children; "
        "simple_gpu_scheduler's process; the tsp queue servers, without their per-job "
        "clients; the floor's shells). All CPU: every process the tool ran, from its start to "
        "its stop, the jobs included (the bench is a child subreaper"
        + ("" if subreaper else ", which failed on this machine: daemons' time is missing")
        + ", so the tmux and screen servers, tsp's daemons and per-job clients are reaped by "
        "it); overhead CPU = all CPU − the floor's. For gpusched that includes its start-up "
        "(the interpreter and its imports, once per run), the in-session wrapper of every job "
        "(a Python process), and for tmux/screen the terminal servers.",
        "",
        "Reading it: with jobs of a millisecond the scheduler's own per-job work is all there "
        "is, and gpusched does more per job than the peers, by design: a job is a database "
        "transition on start and on end (crash safety), a launch spec, an in-session wrapper "
        "that records the exit (a Python process: a spare is started for each launch), and "
        "with tmux two tmux client calls (rename the spare's session; start the next spare and "
        "remove the finished session). The peers only fork. Per-job costs that are nothing "
        "next to a job of minutes add up over a thousand one-millisecond jobs: the GPU time "
        "lost per job is what a job start costs when the scheduler is the bottleneck.",
        "",
        END,
    ]
    return "\n".join(lines)


def write_section(out: Path, section: str) -> None:
    benchlib.write_section(out, section, BEGIN, END, benchlib.INTRO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=1000, help="jobs per run (1000)")
    parser.add_argument("--gpus", type=int, default=4, help="fake GPUs (4)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per tool (3)")
    parser.add_argument("--runners", default=",".join(RUNNERS), help="gpusched runners")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-install", action="store_true", help="skip missing peers")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args(argv)
    if args.jobs < 1 or args.gpus < 1 or args.repeats < 1:
        parser.error("--jobs, --gpus and --repeats must be >= 1")
    runners = [r for r in args.runners.split(",") if r]
    if unknown := set(runners) - set(RUNNERS):
        parser.error(f"unknown runner(s): {', '.join(sorted(unknown))}")
    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="gpusched_tp_"))
    started, busy = time.monotonic(), benchlib.Busy()
    try:
        tools, found, subreaper = measure(
            work, args.jobs, args.gpus, args.repeats, runners, not args.no_install
        )
    finally:
        with contextlib.suppress(Exception):
            drain_orphans(2.0)
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    section = render(tools, found, args, subreaper, time.monotonic() - started, busy.line())
    write_section(args.out, section)
    print(section)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
