"""What the scheduler needs from a place that runs jobs (tmux today)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from app.launch import LaunchRequest

#: Every session the scheduler creates is named `gpujob_...`; other sessions are the user's.
SESSION_PREFIX = "gpujob_"


class RunnerError(Exception):
    """The runner could not answer (e.g. tmux failed in an unexpected way)."""


class LaunchError(RunnerError):
    """A launch failed in a way worth retrying later (tmux error, duplicate session...)."""


@dataclass(frozen=True)
class SessionState:
    name: str
    alive: bool  # False: the job's pane is dead and kept only by remain-on-exit
    pid: int | None  # the pane's process (the wrapper)
    dead_status: int | None  # the pane's exit status once dead (fallback for a lost record)


@dataclass(frozen=True)
class Launched:
    session: str
    pid: int | None


class Runner(Protocol):
    name: str

    def launch(self, req: LaunchRequest) -> Launched: ...

    def sessions(self) -> dict[str, SessionState]: ...

    def kill(self, session: str, grace_s: float = ...) -> None:
        """Kill the session's whole process tree: SIGTERM, SIGKILL after `grace_s`."""

    def remove(self, session: str) -> None: ...

    def attach_argv(self, session: str) -> list[str]: ...

    def pane_tail(self, session: str, lines: int = 50) -> list[str]: ...
