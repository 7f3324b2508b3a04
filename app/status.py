"""`gpusched status`: one snapshot of GPUs, jobs and jobs-file errors, read from the database.

The JSON shape is documented in docs/status-json.md; keep the two in step.
"""

from __future__ import annotations

import json
import time
from typing import Any

from app.control import scheduler_pid
from app.models import JobState
from app.paths import StatePaths
from app.store import Job, Store

SYMBOL = {
    JobState.PENDING: "[ ]",
    JobState.RUNNING: "[→]",
    JobState.COMPLETED: "[✓]",
    JobState.FAILED: "[✗]",
    JobState.KILLED: "[✗]",
    JobState.LOST: "[?]",
    JobState.UNSCHEDULABLE: "[!]",
}


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


def build_status(store: Store, paths: StatePaths) -> dict[str, Any]:
    jobs = store.jobs()
    paused = store.paused()
    running = [j for j in jobs if j.status == JobState.RUNNING]
    gpus: list[dict[str, Any]] = []
    for index, gpu in enumerate(json.loads(store.meta("gpus") or "[]")):
        on_gpu = [j for j in running if index in j.gpus]
        gpus.append(
            {
                "index": index,
                "name": gpu["name"],
                "paused": index in paused,
                "allocated": round(sum(j.share or 0.0 for j in on_gpu), 6),
                "memory_used_mb": gpu["memory_used_mb"],
                "memory_total_mb": gpu["memory_total_mb"],
                "utilization": gpu["utilization"],
                "jobs": [j.id for j in on_gpu],
            }
        )
    pid = scheduler_pid(paths)
    return {
        "scheduler": {
            "running": pid is not None,
            "pid": pid,
            "state_dir": str(paths.root),
            "jobs_file": store.meta("jobs_file"),
            "backend": store.meta("backend"),
            "probe_error": store.meta("probe_error") or None,
            "gpus_at": float(store.meta("gpus_at") or 0) or None,
        },
        "gpus": gpus,
        "jobs": [job_dict(j) for j in jobs],
        "errors": [str(e) for e in store.line_errors()],
    }


def _job_line(job: dict[str, Any], now: float) -> str:
    state = JobState(job["status"])
    words = [SYMBOL[state], f"#{job['id']}", _short_command(job)]
    if job["gpus"]:
        words += ["→ GPU", ",".join(map(str, job["gpus"]))]
    if state == JobState.RUNNING:
        since = now - (job["started_at"] or now)
        words.append(f"→ running {_duration(since)}")
    elif state == JobState.PENDING:
        words.append(f"→ pending ({job['reason'] or 'waiting for the next pass'})")
    elif state in (JobState.FAILED, JobState.KILLED, JobState.LOST):
        code = f" (exit {job['exit_code']})" if job["exit_code"] is not None else ""
        reason = f": {job['reason']}" if job["reason"] and not code else ""
        words.append(f"→ {state}{code}{reason}")
    elif state == JobState.UNSCHEDULABLE:
        words.append(f"→ unschedulable: {job['reason']}")
    else:
        words.append(f"→ {state}")
    return " ".join(words)


def _short_command(job: dict[str, Any]) -> str:
    script = job["script"].rsplit("/", 1)[-1]
    text = f"{script} {job['args']}".strip()
    return text if len(text) <= 60 else text[:57] + "..."


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def format_status(status: dict[str, Any], now: float | None = None) -> str:
    now = time.time() if now is None else now
    sched = status["scheduler"]
    running = f"running (pid {sched['pid']})" if sched["running"] else "not running"
    lines = [f"scheduler: {running}  state: {sched['state_dir']}"]
    if sched["probe_error"]:
        lines.append(f"GPU probe failing: {sched['probe_error']}")
    lines.append("GPUs:" if status["gpus"] else "GPUs: none seen yet (start the scheduler)")
    for gpu in status["gpus"]:
        mem = f"{gpu['memory_used_mb']}/{gpu['memory_total_mb']} MB"
        flag = "  PAUSED" if gpu["paused"] else ""
        on_gpu = " jobs " + ",".join(f"#{j}" for j in gpu["jobs"]) if gpu["jobs"] else ""
        lines.append(
            f"  GPU {gpu['index']} {gpu['name']}: share {gpu['allocated']:g}/1.0, {mem}, "
            f"load {gpu['utilization'] * 100:.0f}%{flag}{on_gpu}"
        )
    order = {JobState.RUNNING: 0, JobState.PENDING: 1}
    jobs = sorted(status["jobs"], key=lambda j: (order.get(JobState(j["status"]), 2), j["id"]))
    lines.append(f"jobs: {len(jobs)}" if jobs else "jobs: none")
    lines += [f"  {_job_line(j, now)}" for j in jobs]
    if status["errors"]:
        lines.append("jobs file errors:")
        lines += [f"  {e}" for e in status["errors"]]
    return "\n".join(lines)
