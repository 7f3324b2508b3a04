"""`gpusched simulate`: the subcommand's arguments and its function (the work is in app.sim)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from app.models import ALLOCATION_MODES
from app.sim import (
    DEFAULT_GPU_MEM_GB,
    POLICY_NAMES,
    SimResult,
    SimulationStuckError,
    make_policy,
    simulate,
)
from app.sim_trace import MIXES, TraceError, TraceJob, format_trace, generate, read_trace


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "simulate",
        help="replay a job trace through the allocator on a virtual clock (compare policies)",
        description="Replay TRACE (CSV: submit_at,priority,requirement,duration,vram_gb,"
        "allowed_gpus) or a generated trace through the scheduler's allocator on a virtual "
        "clock, and report makespan, its lower bound, utilisation and waits per policy. "
        "See docs/simulator.md.",
    )
    p.add_argument("trace", nargs="?", type=Path, help="trace CSV (or use --generate)")
    p.add_argument("--gpus", type=int, default=8, help="GPUs of the simulated machine (8)")
    p.add_argument(
        "--gpu-mem-gb",
        type=float,
        default=DEFAULT_GPU_MEM_GB,
        help=f"memory of each GPU, GB ({DEFAULT_GPU_MEM_GB:g})",
    )
    p.add_argument(
        "--mode",
        choices=ALLOCATION_MODES,
        default="share",
        help="allocation mode of the pack/first-fit/spread policies (share)",
    )
    p.add_argument(
        "--policy",
        default="pack",
        help=f"policy or comma list: {', '.join(POLICY_NAMES)} (default: pack, the daemon's)",
    )
    p.add_argument("--compare", action="store_true", help="run every policy above, side by side")
    p.add_argument(
        "--starvation-timeout",
        type=float,
        default=300.0,
        help="seconds before a blocked job gets GPUs held for it (300, as `start`; inf = never)",
    )
    p.add_argument("--json", action="store_true", help="a JSON list, one object per policy")
    p.add_argument("--generate", type=int, metavar="N", help="simulate N synthetic jobs instead")
    p.add_argument("--seed", type=int, default=0, help="generator seed (0)")
    p.add_argument("--mix", choices=tuple(MIXES), default="mixed", help="generator mix (mixed)")
    p.add_argument(
        "--load",
        type=float,
        default=1.0,
        help="generator arrival rate, as a multiple of the machine's capacity (1.0)",
    )
    p.add_argument("--write-trace", type=Path, metavar="FILE", help="save the trace as CSV")
    p.add_argument(
        "--write-schedule",
        type=Path,
        metavar="FILE",
        help="save every job's start, end and GPUs per policy as CSV",
    )
    p.set_defaults(handler=cmd_simulate)


def _fail(text: str, code: int = 2) -> int:
    print(f"gpusched: error: {text}", file=sys.stderr)
    return code


def cmd_simulate(args: argparse.Namespace) -> int:
    names = list(POLICY_NAMES) if args.compare else [n.strip() for n in args.policy.split(",")]
    problem = _check(args, names)
    if problem:
        return _fail(problem)
    if args.generate is not None:
        jobs = generate(args.generate, args.seed, args.gpus, args.mix, args.load, args.gpu_mem_gb)
        source = f"generated (--generate {args.generate} --seed {args.seed} --mix {args.mix})"
    else:
        try:
            jobs = read_trace(args.trace)
        except TraceError as exc:
            return _fail(str(exc))
        source = str(args.trace)
    if args.write_trace is not None:
        args.write_trace.write_text(format_trace(jobs))
    results: list[SimResult] = []
    for name in names:
        policy = make_policy(name, args.mode, args.starvation_timeout)
        try:
            results.append(simulate(jobs, args.gpus, policy, name=name, gpu_mem_gb=args.gpu_mem_gb))
        except SimulationStuckError as exc:
            return _fail(f"{name}: {exc}", 1)
    if args.write_schedule is not None:
        args.write_schedule.write_text(format_schedule(jobs, results))
    if args.json:
        print(json.dumps([r.summary() for r in results], indent=2))
    else:
        print(format_table(results, source, args))
    return 0


def _check(args: argparse.Namespace, names: list[str]) -> str | None:
    unknown = [n for n in names if n not in POLICY_NAMES]
    if unknown:
        return f"unknown policy {unknown[0]!r} (one of {', '.join(POLICY_NAMES)})"
    if (args.trace is None) == (args.generate is None):
        return "give a trace file or --generate N (not both)"
    if args.gpus < 1:
        return "--gpus must be at least 1"
    if not (args.gpu_mem_gb > 0 and math.isfinite(args.gpu_mem_gb)):
        return "--gpu-mem-gb must be a positive number"
    if not args.starvation_timeout >= 0:
        return "--starvation-timeout must be >= 0"
    if args.generate is not None and (args.generate < 0 or not args.load > 0):
        return "--generate needs N >= 0 and --load > 0"
    return None


def _seconds(value: float) -> str:
    return f"{value:.1f}s"


def format_table(results: list[SimResult], source: str, args: argparse.Namespace) -> str:
    """One row per policy; the jobs line names what was simulated."""
    first = results[0]
    lines = [
        f"{args.gpus} GPUs of {args.gpu_mem_gb:g} GB, mode {args.mode}; {source}: "
        f"{len(first.runs)} jobs ran, {len(first.unschedulable)} unschedulable"
    ]
    for job_id, why in sorted(first.unschedulable.items())[:3]:
        lines.append(f"  unschedulable: job {job_id}: {why}")
    head = ("policy", "makespan", "lower bound", "ratio", "util", "mean wait", "p95 wait")
    rows = [head] + [
        (
            r.policy,
            _seconds(r.makespan),
            _seconds(r.lower_bound),
            f"{r.ratio:.3f}",
            f"{r.utilization * 100:.1f}%",
            _seconds(r.mean_wait),
            _seconds(r.p95_wait),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [
            c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


def format_schedule(jobs: list[TraceJob], results: list[SimResult]) -> str:
    """CSV `policy,job,submit_at,start,end,gpus` (gpus `0+1`; start empty: unschedulable)."""
    out = ["policy,job,submit_at,start,end,gpus"]
    for r in results:
        for job in sorted(jobs, key=lambda j: j.id):
            run = r.runs.get(job.id)
            times = f"{run.start:g},{run.end:g}" if run else ","
            gpus = "+".join(map(str, run.gpus)) if run else ""
            out.append(f"{r.policy},{job.id},{job.submit_at:g},{times},{gpus}")
    return "\n".join(out) + "\n"
