"""The host's RAM, for jobs that declare how much they need (`ram` in a script header).

Read from /proc/meminfo (MemTotal, MemAvailable). A fake GPU file may describe the host too,
so tests and demos control it: `{"gpus": [...], "host": {"ram_total_mb": 65536,
"ram_available_mb": 32768}}`.
"""

from __future__ import annotations

import json
from pathlib import Path

from app.models import HostSnapshot

MEMINFO = Path("/proc/meminfo")


def read_meminfo(path: Path = MEMINFO) -> HostSnapshot | None:
    """None where the file is missing or lacks the fields (not Linux): RAM is then not checked."""
    values: dict[str, int] = {}
    try:
        for line in path.read_text(encoding="ascii", errors="replace").splitlines():
            name, _, rest = line.partition(":")
            if name in ("MemTotal", "MemAvailable"):
                values[name] = int(rest.split()[0]) // 1024  # kB -> MB
    except (OSError, ValueError, IndexError):
        return None
    if len(values) < 2:
        return None
    return HostSnapshot(values["MemTotal"], values["MemAvailable"])


def host_snapshot(fake_gpus: Path | None) -> HostSnapshot | None:
    """The host's RAM now: from the fake GPU file's `host` entry when it has one."""
    if fake_gpus is not None:
        try:
            host = json.loads(fake_gpus.read_text(encoding="utf-8")).get("host")
        except (OSError, ValueError, AttributeError):
            host = None
        if isinstance(host, dict):
            try:
                return HostSnapshot(int(host["ram_total_mb"]), int(host["ram_available_mb"]))
            except (KeyError, TypeError, ValueError):
                return None
    return read_meminfo()
