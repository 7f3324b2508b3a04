"""Every benchmark, one command: installs the peers if missing, then runs each script in turn.

    python bench/run.py [--quick] [--with-dashboard] [--only NAMES] [--skip NAMES]
                        [--out docs/benchmarks.md]

Steps (each a subprocess that rewrites only its own section of --out, between its markers):
latency (submission latency), idlegap (GPU idle gap, with the peers), throughput (short jobs
on 4 fake GPUs, with the peers), scale (ingest, allocator, status, idle daemon) and packing
(placement policies on synthetic traces); `--with-dashboard` adds dashboard (key-to-repaint,
about 2.5 more minutes). Setup first: the peers, simple_gpu_scheduler (pip, into the bench
cache) and task-spooler (apt-get), each skipped with a note in the tables when it cannot be
installed. About 8 minutes on 2 cores; `--quick` runs every step with small sizes in 3.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peers

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent

#: name -> (script, arguments at full size, --quick, --smoke (the test suite's tiny run))
STEPS: dict[str, tuple[str, list[str], list[str], list[str]]] = {
    "latency": ("latency.py", ["--runs", "30"], ["--runs", "10"], ["--runs", "2"]),
    "idlegap": (
        "idlegap.py",
        # 234 gaps per tool: shorter runs moved the overheads by 10-20 ms from run to run.
        ["--chain", "40", "--rounds", "6"],
        ["--chain", "10", "--rounds", "2"],
        ["--chain", "3", "--rounds", "1"],
    ),
    "throughput": (
        "throughput.py",
        ["--jobs", "1000", "--repeats", "1"],
        ["--jobs", "200", "--repeats", "1"],
        ["--jobs", "8", "--repeats", "1"],
    ),
    "scale": (
        "scale.py",
        [],
        [
            "--ingest",
            "20000",
            "--pending",
            "2000",
            "--status-jobs",
            "2000",
            "--idle",
            "10",
            "--repeats",
            "3",
        ],
        [
            "--ingest",
            "200",
            "--pending",
            "50",
            "--status-jobs",
            "100",
            "--idle",
            "1",
            "--repeats",
            "2",
        ],
    ),
    "packing": ("packing.py", [], ["--jobs", "500"], ["--jobs", "60"]),
    "dashboard": (
        "dashboard.py",
        [],
        ["--sizes", "100,1000", "--repeats", "10", "--steady", "2"],
        ["--sizes", "40,60", "--repeats", "2", "--steady", "1.5"],
    ),
}
#: What runs without --only: all but the dashboard (its own bench, added by --with-dashboard).
DEFAULT = ("latency", "idlegap", "throughput", "scale", "packing")
#: Steps that compare with the peers (they install them themselves too, when run alone).
WITH_PEERS = ("idlegap", "throughput")


def run_step(command: list[str]) -> int:
    """Run one step, passing its progress lines on; the section it prints at the end (also
    written to --out) is left out."""
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None
        in_section = False
        for line in proc.stdout:
            in_section = in_section or line.startswith("<!-- ")
            if not in_section or line.startswith("wrote "):
                print(f"   {line.rstrip()}", flush=True)
        return proc.wait()


def names(text: str, parser: argparse.ArgumentParser) -> list[str]:
    chosen = [n.strip() for n in text.split(",") if n.strip()]
    if unknown := [n for n in chosen if n not in STEPS]:
        parser.error(f"unknown step(s) {', '.join(unknown)}; steps: {', '.join(STEPS)}")
    return chosen


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (about 3 minutes)")
    size.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)  # the tests' run
    parser.add_argument("--with-dashboard", action="store_true", help="also the dashboard step")
    parser.add_argument("--only", default="", help=f"comma-separated steps of {','.join(STEPS)}")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks.md")
    parser.add_argument("--no-install", action="store_true", help="skip missing peers")
    args = parser.parse_args(argv)
    steps = names(args.only, parser) or [*DEFAULT, *(["dashboard"] if args.with_dashboard else [])]
    skipped = set(names(args.skip, parser))
    steps = [s for s in steps if s not in skipped]

    if any(s in WITH_PEERS for s in steps):
        print("setup: the peers", flush=True)
        for peer in peers.setup_peers(install=not args.no_install).values():
            state = f"{peer.version} ({peer.note})" if peer.available else f"SKIPPED: {peer.note}"
            print(f"setup: {peer.name}: {state}", flush=True)
    if shutil.which("tmux") is None:
        print("setup: tmux is not installed: the latency step needs it", flush=True)

    failed: list[str] = []
    started = time.monotonic()
    for step in steps:
        script, full, quick, smoke = STEPS[step]
        path = BENCH / script
        if not path.exists():
            print(f"== {step}: {script} is missing, skipped", flush=True)
            continue
        extra = smoke if args.smoke else quick if args.quick else full
        command = [sys.executable, str(path), *extra, "--out", str(args.out)]
        if step in WITH_PEERS and args.no_install:
            command.append("--no-install")
        print(f"== {step}: {' '.join(command[1:])}", flush=True)
        t0 = time.monotonic()
        code = run_step(command)
        took = time.monotonic() - t0
        print(f"== {step}: {'done' if code == 0 else f'FAILED ({code})'} in {took:.0f} s")
        if code != 0:
            failed.append(step)
    print(f"all steps in {time.monotonic() - started:.0f} s; wrote {args.out}")
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
