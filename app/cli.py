"""The `gpusched` command: parse arguments, call one function per subcommand."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sqlite3
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from app import __version__, control, dbguard, headers, jobsfile, sim_cli
from app.cli_settings import effective_settings, settings_parent
from app.config import effective_json, format_effective, load_settings
from app.models import JobSpec, JobState, RequirementError
from app.paths import StatePaths, state_paths
from app.settings import SettingsError
from app.store import Store

Handler = Callable[[argparse.Namespace], int]


def _state_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--state-dir",
        help="state directory (default: $GPUSCHED_STATE_DIR, else ~/.local/state/gpusched)",
    )
    return parent


def _add_start_and_config(
    sub: argparse._SubParsersAction[argparse.ArgumentParser], parent: argparse.ArgumentParser
) -> None:
    settings = settings_parent()
    p = sub.add_parser(
        "start",
        parents=[parent, settings],
        help="run the scheduler in the foreground",
        description="Run the scheduler until Ctrl-C or SIGTERM; running jobs keep "
        "running and are re-adopted by the next start.",
    )
    p.add_argument(
        "--tui",
        action="store_true",
        help="show the live dashboard in front of the scheduler (quitting asks whether to "
        "keep the scheduler running in the background)",
    )
    p.add_argument(
        "--fresh-state",
        action="store_true",
        help="after a corrupt state database was moved aside: start with an empty one; the "
        "lines already in the jobs and commands files are recorded as seen, not run "
        "(ignored while the database is healthy; docs/reliability.md)",
    )
    p.set_defaults(handler=cmd_start)

    p = sub.add_parser(
        "config",
        parents=[parent, settings],
        help="print the effective settings and where each came from",
        description="Print every setting as `gpusched start` with the same flags would use it, "
        "and its source: default, file PATH, env NAME or flag --name.",
    )
    p.add_argument("--json", action="store_true", help="one JSON object instead of lines")
    p.set_defaults(handler=cmd_config)


def build_parser() -> argparse.ArgumentParser:
    parent = _state_parent()
    parser = argparse.ArgumentParser(
        prog="gpusched",
        description="GPU job scheduler: append lines to jobs.txt, jobs run in tmux on free GPUs.",
    )
    parser.add_argument("--version", action="version", version=f"gpusched {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_start_and_config(sub, parent)

    p = sub.add_parser(
        "dashboard",
        parents=[parent],
        help="live dashboard of GPUs and jobs (the default command in a terminal)",
        description="Open the live dashboard on the state directory, whether or not a "
        "scheduler runs there. Press ? inside for the keys.",
    )
    p.set_defaults(handler=cmd_dashboard)

    p = sub.add_parser(
        "add",
        parents=[parent],
        help="append a job line to the jobs file",
        usage="gpusched add SCRIPT [options] [-- ARGUMENTS...]",
        epilog='The job\'s arguments go in --args "..." or after --, e.g. '
        "gpusched add train.py --gpus 0-3 -- --llm qwen2.5-7b-inst --lr 3e-4",
    )
    p.add_argument("script", help="script to run (.py with the env's python, .sh with bash)")
    p.add_argument("--conda", default="", help="conda env name or prefix path to activate")
    p.add_argument("--args", default="", help='arguments, e.g. --args "--llm qwen2.5-7b-inst"')
    p.add_argument("--priority", type=int, default=0, help="lower runs first (default 0)")
    p.add_argument("--gpus", default="", help='allowed GPUs, e.g. "0-3" or "4,5" (default: any)')
    for flag, what in (
        ("--vram", "GPU memory the job needs per GPU, GB (--mode memory/detected, waits)"),
        ("--ram", "host RAM the job needs, GB (waits until that much is available)"),
        ("--ramp-up", "seconds the job takes to allocate its memory (default: the scheduler's)"),
    ):
        p.add_argument(flag, type=float, help=f"{what}; written as --gpusched-{flag[2:]}")
    p.add_argument("--time-limit", metavar="DURATION", help="kill the job after this long "
                   "(90s, 30m, 2h, 1h30m); written as --gpusched-time-limit")  # fmt: skip
    p.add_argument("--retries", metavar="N", help="queue the job again up to N times when it "
                   "fails; written as --gpusched-retries")  # fmt: skip
    p.add_argument(
        "--output-file",
        type=Path,
        help="jobs file to append to (default: the scheduler's on this state directory, "
        "running or last run, else ./jobs.txt)",
    )
    p.set_defaults(handler=cmd_add)

    p = sub.add_parser("status", parents=[parent], help="GPUs, jobs and jobs-file errors")
    p.add_argument("--json", action="store_true", help="one JSON object (docs/status-json.md)")
    p.set_defaults(handler=cmd_status)

    for name, paused in (("pause", True), ("resume", False)):
        p = sub.add_parser(name, parents=[parent], help=f"{name} a GPU (no new jobs placed on it)")
        p.add_argument("gpu", type=int)
        p.set_defaults(handler=cmd_pause, paused=paused)

    p = sub.add_parser(
        "sessions", aliases=["screens"], parents=[parent], help="live job sessions (alias: screens)"
    )
    p.set_defaults(handler=cmd_sessions)
    for name, handler, text in (
        ("attach", cmd_attach, "attach to a job's tmux session"),
        ("kill", cmd_kill, "kill a job (its whole process tree) or drop a pending one"),
        ("retry", cmd_retry, "queue a failed, killed, lost or unschedulable job again"),
        ("logs", cmd_logs, "print a job's log"),
    ):
        p = sub.add_parser(name, parents=[parent], help=text)
        p.add_argument("job", help="job id (or session name for attach)")
        if name == "logs":
            p.add_argument("--follow", "-f", action="store_true", help="keep printing new output")
        p.set_defaults(handler=handler)

    p = sub.add_parser("demo", help="try gpusched on 4 simulated GPUs in a throw-away workspace")
    p.add_argument("--keep", action="store_true", help="keep the workspace afterwards")
    p.add_argument("--dir", type=Path, help="workspace directory (default: a new temp dir)")
    p.add_argument("--tui", action="store_true", help="watch it in the live dashboard (q quits)")
    p.set_defaults(handler=cmd_demo)
    sim_cli.register(sub)
    return parser


def _normalise_argv(argv: Sequence[str]) -> list[str]:
    """`--args "--llm x"` must work as written: glue a dash-leading value to its flag.

    `add SCRIPT [options] -- WORDS...` is the other way to give the arguments: the words after
    `--` become `--args`, quoted so each stays one word."""
    args = list(argv)
    if args[:1] == ["add"] and "--" in args:
        cut = args.index("--")
        args, rest = args[:cut], args[cut + 1 :]
        if rest and any(a == "--args" or a.startswith("--args=") for a in args):
            args.append("--args-twice")  # argparse then names the problem and exits 2
        elif rest:
            args.append(f"--args={shlex.join(rest)}")
    out: list[str] = []
    i = 0
    while i < len(args):
        if args[i] == "--args" and i + 1 < len(args):
            out.append(f"--args={args[i + 1]}")
            i += 2
            continue
        out.append(args[i])
        i += 1
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = _normalise_argv(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command is None:
        if not (sys.stdin.isatty() and sys.stdout.isatty()):
            parser.print_help()
            return 0
        args.state_dir, args.handler = None, cmd_dashboard
    handler: Handler = args.handler
    try:
        return handler(args)
    except (control.ActionError, SettingsError) as exc:
        print(f"gpusched: error: {exc}", file=sys.stderr)
        code: int = getattr(exc, "exit_code", 1)  # e.g. 2: refusing an untrusted file
        return code
    except (dbguard.StorageError, sqlite3.DatabaseError, OSError) as exc:
        error = dbguard.classify(exc, _db_path(args))  # corrupt, locked, full, read-only
        if error is None:
            raise
        print(f"gpusched: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        return 130


def _paths(args: argparse.Namespace) -> StatePaths:
    """--state-dir, else $GPUSCHED_STATE_DIR, else state_dir in ./gpusched.toml, else XDG."""
    state_dir = args.state_dir
    if state_dir is None:
        state_dir = load_settings(os.environ, {}).settings.state_dir
    return state_paths(state_dir)


def _db_path(args: argparse.Namespace) -> Path:
    try:
        return _paths(args).db
    except Exception:  # only for an error message
        return Path("gpusched.db")


def _store(args: argparse.Namespace) -> Store:
    return Store(_paths(args).ensure().db)


def _job_id(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise control.ActionError(f"{text!r} is not a job id") from None


def cmd_start(args: argparse.Namespace) -> int:
    from app.gpus import NoGpuBackend
    from app.service import serve

    settings = effective_settings(args).settings
    try:
        if args.tui and args.fresh_state:
            raise control.ActionError("--fresh-state: start once without --tui")
        if args.tui:
            from app.dashboard import run_with_scheduler

            return run_with_scheduler(settings, [a for a in args.argv if a != "--tui"])
        return serve(settings, fresh_state=args.fresh_state)
    except NoGpuBackend as exc:
        print(f"gpusched: error: {exc}", file=sys.stderr)
        return 2


def cmd_config(args: argparse.Namespace) -> int:
    effective = effective_settings(args)
    print(
        json.dumps(effective_json(effective), indent=2)
        if args.json
        else format_effective(effective)
    )
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    from app.dashboard import run_dashboard

    _store(args).close()  # a storage fault (corrupt, locked...) is one line, not a broken app
    return run_dashboard(_paths(args))


def cmd_add(args: argparse.Namespace) -> int:
    script = Path(args.script).expanduser().absolute()
    if not script.is_file():
        raise control.ActionError(f"script {script} not found")
    try:
        allowed = jobsfile.parse_gpu_list(args.gpus)
    except ValueError as exc:
        raise control.ActionError(f"--gpus: {exc}") from None
    target = args.output_file or _jobs_file_of(_paths(args))
    words = [args.args] if args.args else []
    for flag, value in (("vram", args.vram), ("ram", args.ram), ("ramp-up", args.ramp_up)):
        if value is not None:  # directives the scheduler reads and removes (app/headers.py)
            words.append(f"--gpusched-{flag} {value:g}")
    try:
        words += headers.run_directive_words(args.time_limit, args.retries)
    except RequirementError as exc:
        raise control.ActionError(str(exc)) from None
    if args.conda and (problem := jobsfile.conda_env_problem(args.conda)):
        raise control.ActionError(f"--conda: {problem}")
    spec = JobSpec(args.priority, str(script), args.conda, " ".join(words), allowed)
    try:
        line = jobsfile.format_line(spec)
    except ValueError as exc:  # a line break in the arguments: one line cannot hold it
        raise control.ActionError(f"{exc} (use the commands file for that)") from None
    jobsfile.append_line(Path(target), line)
    print(f"added to {target}: {line}")
    return 0


def _jobs_file_of(paths: StatePaths, wait_s: float = 10.0) -> Path:
    """The jobs file of the scheduler on this state directory: the one running now, else the
    last one that ran (recorded in the database); ./jobs.txt only when none ever ran.

    A scheduler that is starting holds its lock a moment before it records its jobs file:
    until it has (or `wait_s` passed), the file recorded is an older scheduler's, or none."""
    running = control.scheduler_pid(paths)
    deadline = time.monotonic() + wait_s
    recorded: dict[str, str] = {}
    store: Store | None = None
    try:
        while True:
            if store is None and paths.db.exists():
                store = Store(paths.db)  # opened once, then read until the pid matches
            if store is not None:
                recorded = store.metas("jobs_file", "pid")
            if running is None or recorded.get("pid") == str(running):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        if store is not None:
            store.close()
    return Path(recorded["jobs_file"]) if recorded.get("jobs_file") else Path("jobs.txt")


def cmd_status(args: argparse.Namespace) -> int:
    from app.status import build_status, format_status

    status = build_status(_store(args), _paths(args))
    print(json.dumps(status, indent=2) if args.json else format_status(status))
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    print(control.set_paused(_store(args), _paths(args), args.gpu, args.paused))
    return 0


def cmd_kill(args: argparse.Namespace) -> int:
    print(control.kill_job(_store(args), _paths(args), _job_id(args.job)))
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    print(control.retry_job(_store(args), _paths(args), _job_id(args.job)))
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    store = _store(args)
    running = store.jobs([JobState.RUNNING])
    if not running:
        print("no running job sessions")
    for job in running:
        attach = " ".join(control.attach_argv(job))
        print(f"{job.session}  job {job.id}  GPU {','.join(map(str, job.gpus))}  ->  {attach}")
    return 0


def cmd_attach(args: argparse.Namespace) -> int:
    store = _store(args)
    text = args.job
    job = (
        store.job(int(text))
        if text.isdigit()
        else next((j for j in store.jobs([JobState.RUNNING]) if j.session == text), None)
    )
    if job is None or job.status != JobState.RUNNING or not job.session:
        state = f" ({job.status})" if job else ""
        raise control.ActionError(f"job {text}{state} has no live session; see `gpusched sessions`")
    argv = control.attach_argv(job)
    os.execvp(argv[0], argv)
    return 1  # pragma: no cover - exec does not return


def cmd_logs(args: argparse.Namespace) -> int:
    store = _store(args)
    job = control.get_job(store, _job_id(args.job))
    if not job.log_path or not Path(job.log_path).exists():
        raise control.ActionError(f"job {job.id} ({job.status}) has no log yet")
    with Path(job.log_path).open("rb") as log:
        while True:
            chunk = log.read(65536)
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                continue
            current = store.job(job.id)
            if not args.follow or current is None or current.status != JobState.RUNNING:
                return 0
            time.sleep(0.2)


def cmd_demo(args: argparse.Namespace) -> int:
    from app.demo import run_demo

    return run_demo(workdir=args.dir, keep=args.keep, tui=args.tui)
