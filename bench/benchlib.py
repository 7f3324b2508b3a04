"""What the benchmark scripts share: sample statistics, the machine, the docs section writer."""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stats:
    n: int
    median: float
    p95: float
    low: float
    high: float


def stats_ms(values_s: Sequence[float]) -> Stats:
    ms = sorted(v * 1000 for v in values_s)
    if not ms:
        raise ValueError("no samples")
    p95 = ms[0] if len(ms) == 1 else statistics.quantiles(ms, n=20, method="inclusive")[18]
    return Stats(len(ms), statistics.median(ms), p95, ms[0], ms[-1])


def kill_server(socket: str | None) -> None:
    """Kill a private tmux server and remove the socket file tmux leaves behind."""
    if socket is None:
        return
    subprocess.run(["tmux", "-L", socket, "kill-server"], capture_output=True, check=False)
    tmpdir = Path(os.environ.get("TMUX_TMPDIR") or "/tmp") / f"tmux-{os.getuid()}"
    (tmpdir / socket).unlink(missing_ok=True)


def machine_base() -> dict[str, str]:
    """CPU model, core count and OS; each script adds the versions it depends on."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    os_name = platform.platform()
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                os_name = f"{line.split('=', 1)[1].strip(chr(34))}, kernel {platform.release()}"
    return {"CPU": cpu, "cores": str(os.cpu_count()), "OS": os_name}


def write_section(out: Path, section: str, begin: str, end: str, intro: str) -> None:
    """Replace the text between `begin` and `end` in `out` (append it when they are missing;
    create the file with `intro` when it does not exist). The rest is left alone."""
    if out.exists():
        text = out.read_text()
        if begin in text and end in text:
            head, rest = text.split(begin, 1)
            _, tail = rest.split(end, 1)
            text = head + section + tail
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        text = intro + section + "\n"
    out.write_text(text)
