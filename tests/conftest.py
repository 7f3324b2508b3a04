"""Fixtures shared by all tests; keep this file small and generic."""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.paths import StatePaths


@pytest.fixture
def tmux_socket() -> Iterator[str]:
    """A private tmux socket name (`tmux -L NAME`), its server killed after the test."""
    name = f"gpusched_test_{uuid.uuid4().hex[:12]}"
    yield name
    subprocess.run(["tmux", "-L", name, "kill-server"], capture_output=True, check=False)
    tmpdir = os.environ.get("TMUX_TMPDIR", "/tmp")
    Path(tmpdir, f"tmux-{os.getuid()}", name).unlink(missing_ok=True)  # the socket file


@pytest.fixture
def state_paths(tmp_path: Path) -> StatePaths:
    """A fresh, created state directory under the test's tmp_path."""
    return StatePaths(tmp_path / "state").ensure()
