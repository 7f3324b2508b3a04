"""bench/packing.py runs end to end with few jobs and rewrites only its own section."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.sim import POLICY_NAMES

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "bench" / "packing.py"


@pytest.mark.bench
@pytest.mark.timeout(300)
def test_packing_bench_writes_its_section(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text(
        "# Benchmarks\n\nintro\n\n<!-- packing:begin -->\nold\n<!-- packing:end -->\n\nfooter\n"
    )
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--jobs", "60", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        check=False,
        timeout=280,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nintro\n\n<!-- packing:begin -->\n## Packing")
    assert text.endswith("<!-- packing:end -->\n\nfooter\n")
    assert text.count("<!-- packing:begin -->") == 1 and "\nold\n" not in text
    section = text.split("<!-- packing:begin -->", 1)[1].split("<!-- packing:end -->", 1)[0]
    for title in ("fractional-heavy", "multi-GPU-heavy", "mixed"):
        assert f"### {title}: `--generate 60 --seed" in section
    for name in POLICY_NAMES:
        rows = [
            line for line in section.splitlines() if re.match(rf"\| (\*\*)?{name}(\*\*)? ", line)
        ]
        assert len(rows) == 4, name  # three trace tables and the holds-off table
        ratio = rows[0].strip("|").split("|")[3].strip()
        assert re.fullmatch(r"\d\.\d{3}", ratio) and float(ratio) >= 1
    assert "misses the 5% target" in section or "meets the 5% target" in section


def test_packing_bench_appends_its_section_to_a_file_without_markers(tmp_path: Path) -> None:
    out = tmp_path / "benchmarks.md"
    out.write_text("# Benchmarks\n\nother sections\n")
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import packing  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(REPO / "bench"))
    assert packing.main(["--jobs", "8", "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Benchmarks\n\nother sections\n\n<!-- packing:begin -->\n")
    assert text.endswith("<!-- packing:end -->\n")
