"""bench/latency.py runs end to end with tiny N and writes its section (no timed assertions)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "latency.py"


@pytest.mark.bench
@pytest.mark.timeout(300)
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")
def test_latency_bench_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nhand-written intro\n\n<!-- latency:begin -->\nold\n"
                   "<!-- latency:end -->\n\nhand-written footer\n")  # fmt: skip
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", "2", "--chain", "3", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nhand-written intro\n\n<!-- latency:begin -->")
    assert text.endswith("<!-- latency:end -->\n\nhand-written footer\n")
    assert text.count("<!-- latency:begin -->") == 1 and "\nold\n" not in text
    section = text.split("<!-- latency:begin -->", 1)[1].split("<!-- latency:end -->", 1)[0]
    for label in (
        "gpusched: line → session exists",
        "gpusched: line → job's first instruction",
        "gpusched: job i ends → job i+1 starts",
        "floor: `subprocess.run` loop",
    ):
        row = next(line for line in section.splitlines() if line.startswith(f"| {label} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert all(re.fullmatch(r"-?\d+\.\d", c) for c in cells[2:6]), row
    assert re.search(r"overhead over the floor: -?\d+\.\d ms", section)
    assert "Machine: CPU " in section
