"""Hand the terminal to a job's tmux session and take it back when the user detaches."""

from __future__ import annotations

import subprocess

from textual.app import App, SuspendNotSupported
from textual.notifications import SeverityLevel

from app import control
from app.models import Job, JobState


def attach_argv(job: Job) -> list[str]:
    return control.attach_argv(job)


def attach(app: App[str], job: Job) -> tuple[str, SeverityLevel]:
    """Attach to `job`'s session; returns the message to show once the dashboard is back.

    Outside tmux (or inside another tmux server) the dashboard suspends and a nested
    `tmux attach` takes the terminal until the user detaches. Inside tmux on the jobs' own
    server, `switch-client` moves this client to the job instead; Ctrl-b L comes back.
    """
    if job.status != JobState.RUNNING or not job.session:
        return f"job {job.id} is {job.status}: no session to attach to", "error"
    argv = attach_argv(job)
    command = " ".join(argv)
    if "switch-client" in argv:
        switched = subprocess.run(argv, capture_output=True, text=True, check=False)
        if switched.returncode != 0:
            return f"{command}: {switched.stderr.strip()}", "error"
        return f"switched to {job.session}; Ctrl-b L comes back here", "information"
    try:
        with app.suspend():
            result = subprocess.run(argv, check=False)
    except SuspendNotSupported:
        return f"This terminal cannot hand over; run: {command}", "warning"
    if result.returncode != 0:
        return f"{command} exited with {result.returncode}", "error"
    return f"back from job {job.id}", "information"
