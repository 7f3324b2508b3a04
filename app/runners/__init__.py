"""Where jobs run: the Runner protocol and its tmux implementation."""

from app.runners.base import (
    SESSION_PREFIX,
    Launched,
    LaunchError,
    Runner,
    RunnerError,
    SessionState,
)
from app.runners.tmux import TmuxRunner

__all__ = [
    "SESSION_PREFIX",
    "LaunchError",
    "Launched",
    "Runner",
    "RunnerError",
    "SessionState",
    "TmuxRunner",
]
