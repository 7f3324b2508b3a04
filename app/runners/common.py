"""What every runner shares: the in-session wrapper and the launch spec it reads."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

from app.launch import LaunchRequest

#: Runs in the job's session with the scheduler's interpreter (absolute path, so a PATH
#: changed by conda activation or the user's shell cannot swap it).
WRAPPER = Path(__file__).resolve().parent.parent / "wrapper.py"


def wrapper_argv(spec_file: Path) -> list[str]:
    """The wrapper's command line. -I: isolated (no user site, no PYTHON* variables); -S
    skips site-packages and its .pth hooks: the stdlib-only wrapper starts ~50 ms sooner."""
    return [sys.executable, "-I", "-S", str(WRAPPER), str(spec_file)]


def write_spec(req: LaunchRequest) -> None:
    """Atomically write the wrapper's launch spec; 0600 because it holds the environment."""
    spec = {
        "job_id": req.job_id,
        "argv": req.argv,
        "env": req.env,
        "cwd": req.cwd,
        "exit_file": str(req.exit_file),
    }
    # mkstemp creates the file 0600 from the start: the secrets are never world-readable.
    fd, tmp = tempfile.mkstemp(dir=req.spec_file.parent, prefix=f".{req.spec_file.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(spec, f)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(req.spec_file)
    except BaseException:
        with contextlib.suppress(OSError):
            Path(tmp).unlink()
        raise


def prepare_launch(req: LaunchRequest) -> None:
    """Create the job's directories, drop a stale exit record, write the spec."""
    for d in (req.spec_file.parent, req.log_path.parent, req.exit_file.parent):
        d.mkdir(parents=True, exist_ok=True)
    # A record left by an earlier attempt of this job would read as this run's end.
    req.exit_file.unlink(missing_ok=True)
    write_spec(req)
