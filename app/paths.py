"""Every path gpusched uses, in one place.

The state directory is `--state-dir`, else `$GPUSCHED_STATE_DIR`, else
`$XDG_STATE_HOME/gpusched` (default `~/.local/state/gpusched`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


def resolve_state_dir(flag: str | os.PathLike[str] | None = None) -> Path:
    if flag:
        return Path(flag).expanduser().resolve()
    env = os.environ.get("GPUSCHED_STATE_DIR")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return (base / "gpusched").resolve()


@dataclass(frozen=True)
class StatePaths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "gpusched.db"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def exits(self) -> Path:
        """Exit records written by the in-pane wrapper: `job_<id>.json`."""
        return self.root / "exits"

    @property
    def run(self) -> Path:
        """Launch specs read by the in-pane wrapper: `job_<id>.json`."""
        return self.root / "run"

    @property
    def lock(self) -> Path:
        return self.root / "scheduler.lock"

    @property
    def wakeup(self) -> Path:
        """Touched by the CLI so a running scheduler acts on a command at once."""
        return self.root / "wakeup"

    @property
    def scheduler_log(self) -> Path:
        return self.root / "gpusched.log"

    def exit_file(self, job_id: int) -> Path:
        return self.exits / f"job_{job_id}.json"

    def run_spec(self, job_id: int) -> Path:
        return self.run / f"job_{job_id}.json"

    def ensure(self) -> StatePaths:
        for d in (self.root, self.logs, self.exits, self.run):
            d.mkdir(parents=True, exist_ok=True)
        return self


def state_paths(flag: str | os.PathLike[str] | None = None) -> StatePaths:
    return StatePaths(resolve_state_dir(flag))
