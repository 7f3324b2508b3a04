"""What every runner shares: the in-session wrapper and the launch spec it reads."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from app.launch import LaunchRequest
from app.paths import private_dir, private_file

#: Runs in the job's session with the scheduler's interpreter (absolute path, so a PATH
#: changed by conda activation or the user's shell cannot swap it).
WRAPPER = Path(__file__).resolve().parent.parent / "wrapper.py"


def wrapper_argv(spec_file: Path) -> list[str]:
    """The wrapper's command line. -I: isolated (no user site, no PYTHON* variables); -S
    skips site-packages and its .pth hooks: the stdlib-only wrapper starts ~50 ms sooner."""
    return [sys.executable, "-I", "-S", str(WRAPPER), str(spec_file)]


def write_spec(req: LaunchRequest, spare: str | None = None) -> None:
    """Atomically write the wrapper's launch spec; 0600 because it holds the environment.
    `spare`: the token of the spare wrapper that will run it (runners/spare.py)."""
    spec: dict[str, object] = {
        "job_id": req.job_id,
        "argv": req.argv,
        "env": req.env,
        "cwd": req.cwd,
        "exit_file": str(req.exit_file),
    }
    if spare is not None:
        spec["spare"] = spare
    # mkstemp creates the file 0600 from the start: the secrets are never world-readable.
    # No fsync: the spec is read at once by a wrapper of this boot; after a power cut the job
    # is relaunched with a new one. The rename still keeps a reader from half a file.
    fd, tmp = tempfile.mkstemp(dir=req.spec_file.parent, prefix=f".{req.spec_file.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(spec, f)
        Path(tmp).replace(req.spec_file)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def prepare_launch(req: LaunchRequest, spare: str | None = None) -> None:
    """Create the job's directories, drop a stale exit record, write the spec."""
    for d in (req.spec_file.parent, req.log_path.parent, req.exit_file.parent):
        private_dir(d, existing_too=False)
    private_file(req.log_path)  # 0600 before tmux's `cat >>`, screen or the direct runner
    # A record left by an earlier attempt of this job would read as this run's end.
    req.exit_file.unlink(missing_ok=True)
    write_spec(req, spare)


@contextlib.contextmanager
def scheduler_pass(runner: object) -> Iterator[None]:
    """A scheduler pass. A runner that can (tmux, direct) keeps the work that need not delay
    the pass's launches (removing finished jobs' sessions, starting the next spare wrapper)
    for `do_chores`, which the daemon calls once the launched jobs are past their start-up."""
    begin = getattr(runner, "begin_pass", None)
    end = getattr(runner, "end_pass", None)
    if begin is None or end is None:
        yield
        return
    begin()
    try:
        yield
    finally:
        end()


#: Spare wrappers (runners/spare.py) a runner keeps ready: two, so that the one started after
#: a launch has a whole job's length to get ready (a job shorter than an interpreter's
#: start-up would otherwise find none).
SPARES = 2

#: Runner chores (a spare wrapper to start, finished sessions to remove) wait this long after
#: a pass: on 2 cores a job's start-up competes for the CPU with a spare's; never more than
#: CHORES_LATEST_S, however often wake-ups come.
CHORES_AFTER_S = 0.05
CHORES_LATEST_S = 0.5


def runner_chores(runner: object, wake: threading.Event | None) -> None:
    """Do the runner's chores once the jobs just launched had CHORES_AFTER_S to start, unless
    `wake` is set first (then after the next pass). `wake` None: the scheduler is stopping;
    finished sessions are removed, no spare is started."""
    since = getattr(runner, "chores_since", lambda: None)()
    if since is None:
        return
    if wake is None:
        runner.do_chores(spare=False)  # type: ignore[attr-defined]
    elif time.monotonic() - since >= CHORES_LATEST_S or not wake.wait(CHORES_AFTER_S):
        runner.do_chores()  # type: ignore[attr-defined]
