"""How jobs, GPUs and the header look on screen: pure functions from data to Rich text."""

from __future__ import annotations

import time
from collections.abc import Sequence

from rich.text import Text

from app.dashboard.model import GpuView, Header
from app.models import Job, JobState
from app.requirements import llm_name

#: One table row: its key and one Text per column.
Cells = tuple[Text, ...]
Row = tuple[str, Cells]

#: State → (symbol, style). The symbol carries the meaning without colour too.
STATE_LOOK = {
    JobState.PENDING: ("◌", "yellow"),
    JobState.RUNNING: ("▶", "bold green"),
    JobState.COMPLETED: ("✓", "green"),
    JobState.FAILED: ("✗", "bold red"),
    JobState.KILLED: ("■", "magenta"),
    JobState.LOST: ("?", "red"),
    JobState.UNSCHEDULABLE: ("!", "bold yellow"),
}

JOB_COLUMNS = (
    "id",
    "state",
    "prio",
    "script",
    "env",
    "model",
    "need",
    "GPUs",
    "time",
    "exit",
    "info",
)
SPARK = "▁▂▃▄▅▆▇█"


def state_text(state: JobState) -> Text:
    symbol, style = STATE_LOOK[state]
    return Text(f"{symbol} {state.value}", style=style)


def llm_model(args: str) -> str:
    """The job's `--llm` model as the scheduler reads it, "" when it has none."""
    return llm_name(args) or ""


def requirement_text(job: Job) -> str:
    if job.requirement is None:
        return "-"
    amount = job.requirement
    text = f"{amount:g} GPU" if amount <= 1 else f"{amount:g} GPUs"
    if job.vram_mb:
        text += f" {job.vram_mb / 1024:.0f}G"
    return text


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s"


def coarse_duration(seconds: float) -> str:
    """Like duration() without seconds: "<1m", "7m", "2h05m", "3d04h"."""
    if seconds < 60:
        return "<1m"
    text = duration(seconds)
    return text.rsplit("m", 1)[0] + "m" if text.endswith("s") else text


def job_time(job: Job, now: float) -> str:
    """Runtime while running, wait while pending, run length once ended."""
    if job.status == JobState.RUNNING and job.started_at:
        return duration(now - job.started_at)
    if job.status in (JobState.PENDING, JobState.UNSCHEDULABLE):
        # Minutes only: a thousand waiting rows must not all change every second.
        return coarse_duration(now - job.queued_at)
    if job.started_at and job.ended_at:
        return duration(job.ended_at - job.started_at)
    return "-"


def job_info(job: Job) -> str:
    if job.reason:
        return job.reason
    if job.status == JobState.RUNNING and job.session:
        return f"session {job.session}"
    return ""


def job_cells(job: Job, now: float) -> tuple[Text, ...]:
    """One row of the jobs table, in JOB_COLUMNS order.

    Every cell is a Text: a plain str would be parsed as Rich markup, and a job's arguments
    or reason may hold brackets (`--tags [gpu]`, or `[/x]`, which would not even parse).
    """
    return (
        Text(str(job.id)),
        state_text(job.status),
        Text(str(job.priority)),
        Text(job.script.rsplit("/", 1)[-1]),
        Text(job.conda_env or "-"),
        Text(llm_model(job.args) or "-"),
        Text(requirement_text(job)),
        Text(",".join(map(str, job.gpus)) or "-"),
        Text(job_time(job, now)),
        Text("" if job.exit_code is None else str(job.exit_code)),
        Text(job_info(job)),
    )


def search_text(job: Job) -> str:
    """What `/` filters on: every field a user may remember a job by."""
    parts = (f"#{job.id}", job.status.value, job.script, job.conda_env, job.args, job.reason,
             job.source, job.session or "")  # fmt: skip
    return " ".join(parts).lower()


def bar(fraction: float, width: int = 12) -> Text:
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    style = "red" if fraction >= 0.9 else "yellow" if fraction >= 0.6 else "green"
    text = Text("█" * filled, style=style)
    text.append("░" * (width - filled), style="dim")
    return text


def sparkline(samples: Sequence[float], width: int = 20) -> Text:
    shown = list(samples)[-width:]
    chars = "".join(SPARK[min(int(max(s, 0.0) * len(SPARK)), len(SPARK) - 1)] for s in shown)
    return Text(chars.rjust(width), style="cyan")


GPU_COLUMNS = ("GPU", "name", "memory", "used", "util", "history", "share", "jobs")


def gpu_cells(gpu: GpuView) -> tuple[Text, ...]:
    total = max(gpu.memory_total_mb, 1)
    name = Text(gpu.name)
    if gpu.paused:
        name = Text.assemble(("⏸ PAUSED ", "bold yellow"), gpu.name)
    share = Text(f"{gpu.allocated:g}/1.0", style="bold" if gpu.allocated >= 1 else "")
    jobs = " ".join(f"#{j}" for j in gpu.jobs) or "-"
    return (
        Text(str(gpu.index)),
        name,
        bar(gpu.memory_used_mb / total),
        Text(f"{gpu.memory_used_mb / 1024:.1f}/{gpu.memory_total_mb / 1024:.0f}G"),
        Text(f"{gpu.utilization * 100:3.0f}%"),
        sparkline(gpu.history),
        share,
        Text(jobs),
    )


COUNT_ORDER = ("running", "pending", "completed", "failed", "killed", "lost", "unschedulable")


def header_text(header: Header, now: float | None = None) -> Text:
    now = time.time() if now is None else now
    text = Text()
    if header.scheduler_pid:
        up = f", up {duration(now - header.started_at)}" if header.started_at else ""
        text.append(f"● scheduler running (pid {header.scheduler_pid}{up})", style="bold green")
    else:
        text.append("○ scheduler not running", style="bold red")
        text.append(" — start it with `gpusched start`; jobs keep their state", style="dim")
    text.append(f"   jobs file {header.jobs_file or '-'}   backend {header.backend or '-'}")
    counts = "  ".join(
        f"{header.counts[name]} {name}" for name in COUNT_ORDER if header.counts.get(name)
    )
    text.append("\n")
    text.append(counts or "no jobs yet", style="bold")
    text.append(f"   state {header.state_dir}", style="dim")
    if header.probe_error:
        text.append(f"\nGPU probe failing: {header.probe_error}", style="bold red")
    elif not header.scheduler_pid and header.gpus_at:
        text.append(f"\nGPU figures from {duration(now - header.gpus_at)} ago", style="yellow")
    return text
