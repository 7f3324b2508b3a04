"""GPU idle gap: a job ends -> the next waiting job starts on that GPU; gpusched and its peers.

    python bench/idlegap.py [--chain K] [--rounds R] [--out docs/benchmarks.md] [--no-install]

Every tool runs the same chain of K jobs on ONE fake GPU (id 0), R rounds, the tools' order
rotated each round; each job (bench's JOB_SCRIPT, run by the interpreter's full path)
records its first and last instruction, and a gap is start of job i+1 - end of job i.
- floor: the chain run back to back by a plain `sh` script;
- gpusched with each runner (`--runner tmux|direct|screen`): a `gpusched start` subprocess
  on one fake GPU (`--ramp-up 0`, private tmux socket / screen directory) gets the K lines in
  one write (kept running across rounds, warmed up by one job);
- simple_gpu_scheduler `--gpus 0` with the K commands on stdin;
- task-spooler: one queue (one slot) with `CUDA_VISIBLE_DEVICES=0`, the K jobs submitted first.
The section between the idlegap markers in --out is replaced; everything started is stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import itertools
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib
import peers
from benchlib import (
    JOB_SCRIPT,
    Scheduler,
    Stats,
    bench_env,
    job_line,
    read_times,
    running,
    stats_ms,
    wait_for,
)

REPO = Path(__file__).resolve().parent.parent
BEGIN = "<!-- idlegap:begin -->"
END = "<!-- idlegap:end -->"
RUNNERS = ("tmux", "direct", "screen")
#: Targets from the issue: overhead over the floor, median, ms.
TARGETS = {"tmux": 25.0, "direct": 5.0}


@dataclass
class Chain:
    """One tool's gaps over all rounds, and for gpusched where each gap went."""

    label: str
    gaps: list[float] = field(default_factory=list)
    end_to_record: list[float] = field(default_factory=list)
    record_to_pass: list[float] = field(default_factory=list)
    pass_to_first: list[float] = field(default_factory=list)
    note: str = ""


def gaps_of(outs: Sequence[Path]) -> list[float]:
    times = sorted(read_times(o) for o in outs)
    return [b[0] - a[1] for a, b in itertools.pairwise(times)]


def run_gpusched(
    sched: Scheduler, work: Path, tag: str, script: Path, chain: int, result: Chain
) -> None:
    outs = [work / f"{tag}_{i:03d}.out" for i in range(chain)]
    total = len(benchlib.db_jobs(sched.db)) + chain
    sched.append([job_line(script, out, 0) for out in outs])
    wait_for(lambda: sched.settled(total), 60 + chain, f"gpusched {sched.runner}'s chain", 0.05)
    jobs = sched.jobs_by_out()
    runs = sorted((read_times(out), jobs[str(out)]) for out in outs)
    for ((_, end), job), ((start, _), nxt) in itertools.pairwise(runs):
        result.gaps.append(start - end)
        ended, started = float(job["ended_at"]), float(nxt["started_at"])  # type: ignore[arg-type]
        result.end_to_record.append(ended - end)
        result.record_to_pass.append(started - ended)
        result.pass_to_first.append(start - started)


Tool = Callable[[Sequence[Sequence[str]], Sequence[int], Callable[[], bool], float], object]


def run_peer(run: Tool, work: Path, tag: str, script: Path, chain: int, result: Chain) -> None:
    outs = [work / f"{tag}_{i:03d}.out" for i in range(chain)]
    argv = [[sys.executable, str(script), str(out), "0"] for out in outs]
    run(argv, [0], lambda: all(o.exists() for o in outs), 60.0 + chain)
    result.gaps += gaps_of(outs)


def measure(
    work: Path, chain: int, rounds: int, runners: Sequence[str], install: bool
) -> tuple[list[Chain], dict[str, peers.Peer]]:
    env, _ = bench_env(REPO)
    script = work / "job.py"
    script.write_text(JOB_SCRIPT)
    found = peers.setup_peers(install)
    floor = Chain("floor: plain `sh` loop")
    chains: dict[str, Chain] = {"floor": floor}
    tools: dict[str, Callable[[int], None]] = {}
    loop = peers.ShellLoop(work / "sh")
    tools["floor"] = lambda r: run_peer(loop.run, work, f"sh{r}", script, chain, floor)
    with contextlib.ExitStack() as stack:
        for runner in runners:
            if runner == "tmux" and shutil.which("tmux") is None:
                continue
            if runner == "screen" and shutil.which("screen") is None:
                continue
            sched = Scheduler(work / f"gpusched_{runner}", 1, env, runner=runner)
            stack.enter_context(running(sched, script))
            c = chains[runner] = Chain(f"gpusched --runner {runner}")
            tools[runner] = lambda r, s=sched, c=c: run_gpusched(
                s, work, f"{s.runner}{r}", script, chain, c
            )
        for key, peer in found.items():
            c = chains[key] = Chain(peer.name)
            if not peer.available:
                c.note = f"skipped: {peer.note}"
                continue
            tool = peers.SimpleGpuScheduler(peer) if key == "sgs" else peers.TaskSpooler(work / key)
            tools[key] = lambda r, t=tool, k=key, c=c: run_peer(
                t.run, work, f"{k}{r}", script, chain, c
            )
        order = list(tools)
        for r in range(rounds):
            rotated = order[r % len(order) :] + order[: r % len(order)]
            print(f"idle gap round {r + 1}/{rounds}: {', '.join(rotated)}", flush=True)
            for key in rotated:
                if chains[key].note:
                    continue
                try:
                    tools[key](r)
                except Exception as e:  # a peer that breaks is reported, not fatal
                    if key not in found:
                        raise
                    chains[key].note = f"failed: {e}"
                    chains[key].gaps.clear()
                    print(f"{key} failed: {e}", flush=True)
    return list(chains.values()), found


# ---- report -----------------------------------------------------------------------------------

HEADER = (
    "| tool | gaps | median ms | p95 ms | min ms | max ms | overhead over the floor, ms "
    "(medians) | ratio to the floor |\n|---|---:|---:|---:|---:|---:|---:|---:|"
)


def row(c: Chain, floor: Stats) -> str:
    if not c.gaps:
        return f"| {c.label} | - | - | - | - | - | {c.note or 'not run'} | - |"
    s = stats_ms(c.gaps)
    over = "-" if c.label.startswith("floor") else f"{s.median - floor.median:+.1f}"
    ratio = "-" if c.label.startswith("floor") else f"{s.median / floor.median:.2f}x"
    return (
        f"| {c.label} | {s.n} | {s.median:.1f} | {s.p95:.1f} | {s.low:.1f} | {s.high:.1f} "
        f"| {over} | {ratio} |"
    )


def render(
    chains: list[Chain],
    found: dict[str, peers.Peer],
    chain: int,
    rounds: int,
    took: float,
    load: str = "",
) -> str:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    by_label = {c.label: c for c in chains}
    floor = stats_ms(by_label["floor: plain `sh` loop"].gaps)
    lines = [
        BEGIN,
        "## GPU idle gap",
        "",
        f"Generated by `python bench/idlegap.py --chain {chain} --rounds {rounds}` on {when} "
        f"({took:.0f} s).",
        "",
        "Machine: " + benchlib.machine_line() + ".",
        "",
        load,
        "",
        "Peers: "
        + "; ".join(f"{p.name} {p.version or '-'} ({p.note})" for p in found.values())
        + ".",
        "",
        f"Each tool runs the same chain of {chain} jobs on ONE fake GPU (id 0), {rounds} rounds "
        "with the tools' order rotated each round. A job is `python job.py OUT 0` by the "
        f"interpreter's full path (`{sys.executable}`; gpusched runs a `.py` job with the "
        "`python3` of its PATH, whose first entry is that interpreter's directory); it records "
        "`time.time()` as its first and its last instruction, and a gap is start of job i+1 − "
        "end of job i, so every gap includes the job's own interpreter shut-down and start-up. "
        "The floor runs the chain back to back from a plain `sh` script. gpusched: a "
        "`gpusched start` subprocess on one fake GPU (`--ramp-up 0`, private tmux socket or "
        "screen directory), the chain appended to its jobs file in one write, the scheduler "
        "kept running across rounds. simple_gpu_scheduler: `--gpus 0`, the commands on its "
        "stdin. task-spooler: one queue with one slot, `CUDA_VISIBLE_DEVICES=0` (Debian's "
        "1.0.1 has no GPU support), the chain submitted with `tsp -n` before the first job ends.",
        "",
        HEADER,
        *(row(c, floor) for c in chains),
        "",
    ]
    for runner in RUNNERS:
        c = by_label.get(f"gpusched --runner {runner}")
        if c is None or not c.gaps:
            continue
        e2r, r2p, p2f = (stats_ms(c.end_to_record), stats_ms(c.record_to_pass),
                         stats_ms(c.pass_to_first))  # fmt: skip
        lines.append(
            f"- gpusched `{runner}`, where the gap goes (medians): job's last instruction → its "
            f"wrapper records the exit {e2r.median:.1f} ms (interpreter shut-down, exit record "
            f"written with fsync + rename); → the scheduler pass that launches the next job "
            f"begins {r2p.median:.1f} ms (inotify wake-up, reap); → next job's first "
            f"instruction {p2f.median:.1f} ms (allocation, SQLite, launch, wrapper, job "
            "start-up)."
        )
    verdicts = []
    for runner, target in TARGETS.items():
        c = by_label.get(f"gpusched --runner {runner}")
        if c is None or not c.gaps:
            verdicts.append(f"`{runner}`: not measured")
            continue
        over = stats_ms(c.gaps).median - floor.median
        verdicts.append(
            f"`{runner}` {over:.1f} ms against ≤ {target:g} ms: "
            + ("met" if over <= target else "missed")
        )
    lines += ["", "Targets (median overhead over the floor): " + "; ".join(verdicts) + ".", ""]
    under = [c.label for c in chains if c.gaps and stats_ms(c.gaps).median < floor.median]
    if under:
        lines += [
            f"Below the floor: {', '.join(under)}. The floor is the same chain run from a `sh` "
            "loop, not a strict lower bound: the peers came out a few milliseconds under it in "
            "most long runs here (not investigated), so compare gpusched's rows with theirs "
            "too. Shorter runs (57 gaps per tool) moved the overheads by 10-20 ms from run to "
            "run on the same day.",
            "",
        ]
    direct = by_label.get("gpusched --runner direct")
    missed = (
        direct is not None
        and bool(direct.gaps)
        and (stats_ms(direct.gaps).median - floor.median > TARGETS["direct"])
    )
    lines += [NOTES[0], "", NOTES[2] + (DIRECT_MISSED if missed else ""), "", END]
    return "\n".join(lines)


#: How gpusched keeps the gap short, and what is left of it (from profiling the passes).
NOTES = [
    "How the gap is kept short: the exit record is written from a temp file outside the "
    "watched `exits/` folder and renamed in, so inotify wakes the scheduler once, when the "
    "record is complete; the pass reads the pending queue incrementally (`app/pending.py`); "
    "the job is handed to a *spare* wrapper, a `python -I -S app/wrapper.py` started ahead "
    "of time and waiting on its stdin (direct) or a FIFO (tmux, whose session is renamed to "
    "the job's), so no interpreter starts between two jobs (`app/runners/spare.py`); the "
    "wrapper imports nothing before it forks the job (the C parts of `json` and `signal`) and "
    "exits without interpreter shut-down; removing the finished job's tmux session and "
    "starting the next spare wait until 50 ms after the pass (`runner_chores`), so they do "
    "not compete with the new job's start-up for the CPU.",
    "",
    "What is left, profiled in-process: the record (write, fsync, rename) and the inotify "
    "wake-up take 1–2 ms; the pass up to the hand-over about 4 ms with `direct` and 10 ms "
    "with `tmux`, most of it the `tmux rename-session` client process (every tmux command is "
    "a fork of the scheduler and a new tmux client); the spare reads its spec and forks the "
    "job in 1–2 ms. The rest of the overhead is the next job's own start-up running slower "
    "than the floor's: on 2 cores shared with other processes, whatever runs beside a job's "
    "interpreter start-up (the scheduler finishing its pass, tmux's `pipe-pane` logger, the "
    "job's output reader threads) delays it, while the floor and the peers run nothing beside "
    "it. On a quiet 16-core machine (docs/gpu.md) the overhead was +9 and +20 ms with `tmux` "
    "and +6 and +12 ms with `direct` in two runs, the peers' between −12 and +9 ms: less "
    "CPU contention shrinks it, and run-to-run noise there is about 10 ms.",
]
DIRECT_MISSED = (
    " The 5 ms target for `direct` is tighter than what the record, the wake-up, a Python "
    "scheduler pass (SQLite transitions, allocation, the launch spec) and the hand-over to the "
    "spare cost here before the job even starts (about 6–7 ms in the profile, taken under "
    "load): it is missed here, and reaching it reliably would take less Python between the "
    "wake-up and the hand-over."
)


def write_section(out: Path, section: str) -> None:
    benchlib.write_section(out, section, BEGIN, END, benchlib.INTRO)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--chain", type=int, default=20, help="jobs per chain (20)")
    parser.add_argument("--rounds", type=int, default=3, help="chains per tool (3)")
    parser.add_argument("--runners", default=",".join(RUNNERS), help="gpusched runners")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-install", action="store_true", help="skip missing peers")
    parser.add_argument("--keep", action="store_true", help="keep the temporary workspace")
    args = parser.parse_args(argv)
    if args.chain < 2 or args.rounds < 1:
        parser.error("--chain must be >= 2 and --rounds >= 1")
    runners = [r for r in args.runners.split(",") if r]
    if unknown := set(runners) - set(RUNNERS):
        parser.error(f"unknown runner(s): {', '.join(sorted(unknown))}")
    sys.path.insert(0, str(REPO))
    work = Path(tempfile.mkdtemp(prefix="gpusched_gap_"))
    started, busy = time.monotonic(), benchlib.Busy()
    try:
        chains, found = measure(work, args.chain, args.rounds, runners, not args.no_install)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    section = render(
        chains, found, args.chain, args.rounds, time.monotonic() - started, busy.line()
    )
    write_section(args.out, section)
    print(section)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
