"""`gpusched status`: one snapshot of GPUs, jobs and jobs-file errors, read from the database.

The JSON shape is documented in docs/status-json.md; keep the two in step. The plain view
prints one line per job, most relevant first (running, pending in queue order, recently ended):

    [→] #12 python3 train.py --lr 3  → GPU 0 → running (pid 1234, 3m05s)
    [ ] #14 eval.py --split test     → pending (needs 1 GPU: GPU 0 share 1/1.0 used)
    [✗] #11 python3 bad.py           → GPU 1 → failed (exit 3)
"""

from __future__ import annotations

import json
import shlex
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from app.control import scheduler_pid
from app.models import ENDED_STATES, Job, JobState
from app.paths import StatePaths
from app.store import Store

SYMBOL = {
    JobState.PENDING: "[ ]",
    JobState.RUNNING: "[→]",
    JobState.COMPLETED: "[✓]",
    JobState.FAILED: "[✗]",
    JobState.KILLED: "[✗]",
    JobState.LOST: "[?]",
    JobState.UNSCHEDULABLE: "[!]",
}
#: Most lines of each group the plain view prints; the rest are counted on a `… N more` line.
LIMITS = {"running": 50, "pending": 20, "ended": 10}
#: Longest command text shown; longer ones end with `…` (`--json` has them whole).
COMMAND_WIDTH = 60


@dataclass(frozen=True)
class PlainJob:
    """What the plain view shows of a job beyond its JSON entry."""

    kind: str  # "script", or "command" (a commands-file line: `script` is shell code)
    command: str | None  # the command as launched (launch.display_command), None before
    pid: int | None
    seq: int  # queue order within a priority


class Status(dict[str, Any]):
    """`build_status`'s answer: exactly the `--json` object, plus `plain` (job id ->
    PlainJob) for the plain view, kept out of the JSON, whose shape is documented."""

    def __init__(self, data: dict[str, Any], plain: dict[int, PlainJob]) -> None:
        super().__init__(data)
        self.plain = plain


def job_dict(job: Job) -> dict[str, Any]:
    return {
        "id": job.id,
        "status": job.status.value,
        "priority": job.priority,
        "script": job.script,
        "conda_env": job.conda_env,
        "args": job.args,
        "gpus": list(job.gpus),
        "requirement": job.requirement,
        "session": job.session,
        "log": job.log_path,
        "exit_code": job.exit_code,
        "reason": job.reason,
        "source": job.source,
        "submitted_at": job.submitted_at,
        "started_at": job.started_at,
        "ended_at": job.ended_at,
    }


#: The columns `build_status` reads: the JSON's, and the plain view's.
_COLUMNS = (
    "id, status, priority, script, conda_env, args, gpus, requirement, session, log_path, "
    "exit_code, reason, source, submitted_at, started_at, ended_at, share, kind, command, pid, seq"
)


def build_status(store: Store, paths: StatePaths) -> Status:
    # Straight from the rows, not through `Job` objects: with 10,000 jobs building those
    # took most of the time of `gpusched status`. Same values as `job_dict(Job.from_row(r))`.
    jobs: list[dict[str, Any]] = []
    plain: dict[int, PlainJob] = {}
    running: list[tuple[int, tuple[int, ...], float | None]] = []
    for row in store.db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY id"):
        (job_id, state, priority, script, conda_env, args, gpus_text, requirement, session,
         log_path, exit_code, reason, source, submitted_at, started_at, ended_at, share, kind,
         command, pid, seq) = tuple(row)  # fmt: skip
        gpus = tuple(int(g) for g in gpus_text.split(",")) if gpus_text else ()
        jobs.append(
            {
                "id": job_id,
                "status": JobState(state).value,
                "priority": priority,
                "script": script,
                "conda_env": conda_env,
                "args": args,
                "gpus": list(gpus),
                "requirement": requirement,
                "session": session,
                "log": log_path,
                "exit_code": exit_code,
                "reason": reason,
                "source": source,
                "submitted_at": submitted_at,
                "started_at": started_at,
                "ended_at": ended_at,
            }
        )
        plain[job_id] = PlainJob(kind, command, pid, seq)
        if state == JobState.RUNNING:
            running.append((job_id, gpus, share))
    paused = store.paused()
    gpu_rows: list[dict[str, Any]] = []
    for index, gpu in enumerate(json.loads(store.meta("gpus") or "[]")):
        on_gpu = [(job_id, share) for job_id, gpus, share in running if index in gpus]
        gpu_rows.append(
            {
                "index": index,
                "name": gpu["name"],
                "paused": index in paused,
                "allocated": round(sum(share or 0.0 for _, share in on_gpu), 6),
                "memory_used_mb": gpu["memory_used_mb"],
                "memory_total_mb": gpu["memory_total_mb"],
                "utilization": gpu["utilization"],
                "jobs": [job_id for job_id, _ in on_gpu],
            }
        )
    pid = scheduler_pid(paths)
    data = {
        "scheduler": {
            "running": pid is not None,
            "pid": pid,
            "state_dir": str(paths.root),
            "jobs_file": store.meta("jobs_file"),
            "backend": store.meta("backend"),
            "probe_error": store.meta("probe_error") or None,
            "config_error": store.meta("config_error") or None,
            "gpus_at": float(store.meta("gpus_at") or 0) or None,
        },
        "gpus": gpu_rows,
        "jobs": jobs,
        "errors": [str(e) for e in store.line_errors()],
    }
    return Status(data, plain)


# ---- the plain view -------------------------------------------------------------------------


def _plain(status: dict[str, Any], job: dict[str, Any]) -> PlainJob:
    """The job's PlainJob; a plain dict (e.g. read back from `--json`) gives what it can."""
    found = getattr(status, "plain", {}).get(job["id"])
    return found if found is not None else PlainJob("script", None, None, job["id"])


def command_text(job: dict[str, Any], plain: PlainJob) -> str:
    """What the job runs, short: a commands-file line as written; once launched, the command
    with the script's directory and the scheduler's `--cuda` left out (`python3 train.py
    --lr 3`); before, the script's name and its arguments as written."""
    if plain.kind == "command":
        text = job["script"]
    elif plain.command:
        text = _script_by_name(plain.command, ",".join(map(str, job["gpus"])))
    else:
        text = f"{PurePath(job['script']).name} {job['args']}".strip()
    text = " ".join(text.split())  # one line, whatever the command's whitespace
    return text if len(text) <= COMMAND_WIDTH else text[: COMMAND_WIDTH - 1] + "…"


def _script_by_name(command: str, gpus: str) -> str:
    """`python3 /home/u/train.py --lr 3 --cuda 0` -> `python3 train.py --lr 3`: the script (the
    first word, or the second after its interpreter) by its name, and without the `--cuda` the
    scheduler wrote, which the GPU column shows."""
    try:
        words = shlex.split(command)
    except ValueError:
        return command
    for i, word in enumerate(words[:2]):
        if word.startswith("/"):
            words[i] = PurePath(word).name
            break
    out: list[str] = []
    i = 0
    while i < len(words):
        if words[i] == "--cuda" and words[i + 1 : i + 2] == [gpus]:
            i += 2
            continue
        if words[i] != f"--cuda={gpus}":
            out.append(words[i])
        i += 1
    return shlex.join(out)


def _outcome(job: dict[str, Any], plain: PlainJob, now: float) -> str:
    state = JobState(job["status"])
    reason = job["reason"]
    if state == JobState.RUNNING:
        since = _duration(now - (job["started_at"] or now))
        return f"running (pid {plain.pid}, {since})" if plain.pid else f"running ({since})"
    if state == JobState.PENDING:
        return f"pending ({reason or 'waiting for the next pass'})"
    if state == JobState.FAILED:
        if job["exit_code"] is not None:  # reason: e.g. retries given up (app/limits.py)
            return f"failed (exit {job['exit_code']}{'; ' + reason if reason else ''})"
        return f"failed ({reason})" if reason else "failed"
    if state in (JobState.LOST, JobState.UNSCHEDULABLE, JobState.KILLED) and reason:
        return f"{state} ({reason})"
    return str(state)  # completed, killed


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _groups(jobs: list[dict[str, Any]], status: dict[str, Any]) -> list[tuple[str, list[Any]]]:
    """(group, its jobs in display order): running by start, pending in queue order (priority,
    then first come first served), ended ones most recent first."""
    running = [j for j in jobs if j["status"] == JobState.RUNNING]
    pending = [j for j in jobs if j["status"] == JobState.PENDING]
    ended = [j for j in jobs if JobState(j["status"]) in ENDED_STATES]
    running.sort(key=lambda j: (j["started_at"] or 0.0, j["id"]))
    pending.sort(key=lambda j: (j["priority"], _plain(status, j).seq, j["id"]))
    ended.sort(key=lambda j: (-(j["ended_at"] or j["submitted_at"] or 0.0), -j["id"]))
    return [("running", running), ("pending", pending), ("ended", ended)]


def format_jobs(
    status: dict[str, Any], now: float, limits: Mapping[str, int] = LIMITS
) -> list[str]:
    """The jobs section: a count line, then one aligned line per job shown, each group's
    overflow counted on a `… N more` line."""
    jobs = status["jobs"]
    if not jobs:
        return ["jobs: none"]
    counts = Counter(JobState(j["status"]) for j in jobs)
    summary = ", ".join(f"{counts[s]} {s}" for s in JobState if counts[s])
    groups = [(name, members, members[: limits[name]]) for name, members in _groups(jobs, status)]
    rows = {
        j["id"]: (
            SYMBOL[JobState(j["status"])],
            f"#{j['id']}",
            command_text(j, _plain(status, j)),
            f"GPU {','.join(map(str, j['gpus']))}" if j["gpus"] else "",
            _outcome(j, _plain(status, j), now),
        )
        for _, _, shown in groups
        for j in shown
    }
    id_width = max((len(r[1]) for r in rows.values()), default=0)
    cmd_width = max((len(r[2]) for r in rows.values()), default=0)
    gpu_width = max((len(r[3]) for r in rows.values()), default=0)
    lines = [f"jobs: {len(jobs)} ({summary})"]
    for name, members, shown in groups:
        for j in shown:
            symbol, job_id, command, gpus, outcome = rows[j["id"]]
            place = f"→ {gpus:<{gpu_width}} → " if gpus else "→ "
            lines.append(
                f"  {symbol} {job_id:<{id_width}} {command:<{cmd_width}}  {place}{outcome}"
            )
        if len(members) > len(shown):
            lines.append(f"  … {len(members) - len(shown)} more {name}")
    if any(len(members) > len(shown) for _, members, shown in groups):
        lines.append("  (gpusched status --json lists every job)")
    return lines


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    sched = status["scheduler"]
    running = f"running (pid {sched['pid']})" if sched["running"] else "not running"
    lines = [f"scheduler: {running}  state: {sched['state_dir']}"]
    if sched["probe_error"]:
        lines.append(f"GPU probe failing: {sched['probe_error']}")
    if sched.get("config_error"):
        lines.append(f"llm config not in use (the last good one is): {sched['config_error']}")
    lines.append("GPUs:" if status["gpus"] else "GPUs: none seen yet (start the scheduler)")
    for gpu in status["gpus"]:
        mem = f"{gpu['memory_used_mb']}/{gpu['memory_total_mb']} MB"
        flag = "  PAUSED" if gpu["paused"] else ""
        on_gpu = " jobs " + ",".join(f"#{j}" for j in gpu["jobs"]) if gpu["jobs"] else ""
        lines.append(
            f"  GPU {gpu['index']} {gpu['name']}: share {gpu['allocated']:g}/1.0, {mem}, "
            f"load {gpu['utilization'] * 100:.0f}%{flag}{on_gpu}"
        )
    lines += format_jobs(status, now)
    if status["errors"]:
        lines.append("jobs file errors:")
        lines += [f"  {e}" for e in status["errors"]]
    return "\n".join(lines)
