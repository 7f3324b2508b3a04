"""bench/gpu_check.py, the real-GPU check, runs its whole scenario on simulated GPUs.

On a GPU machine the same script drives real PyTorch jobs (docs/gpu.md); here the jobs only
pretend to allocate, and the GPU file stands in for the foreign process's memory, so what is
tested is the scheduler's side of it: the memory threshold, two half-GPU jobs side by side, a
whole-GPU job after them, the out-of-memory requeue, and a kill that needs SIGKILL.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(240)
def test_gpu_check_scenario_passes_on_simulated_gpus(tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py"), "--out", str(out),
         "--gpu-backend", "fake", "--runner", "direct"],
        capture_output=True, text=True, check=False, timeout=220,
    )  # fmt: skip
    report = json.loads(out.read_text())
    assert result.returncode == 0, result.stdout + result.stderr + report.get("error", "")
    assert len(report["steps"]) == 10 and all(report["steps"].values())
    assert "used by other processes (threshold 80%)" in report["reason_while_foreign"]
    oom = report["oom_job"]
    assert oom["status"] == "failed" and oom["exit_code"] == 1
    assert oom["reason"].startswith("CUDA out of memory again with ")
    records = report["records"]
    # Both halves got GPU 0 through the rewritten --cuda, and overlapped in time.
    a, b = records["half_a"], records["half_b"]
    assert a["cuda_arg"] == b["cuda_arg"] == "0" and a["GPUSCHED_GPUS"] == "0"
    assert a["start"] < b["end"] and b["start"] < a["end"]
    # The whole-GPU job started only after both halves had ended.
    assert records["whole"]["start"] >= max(a["end"], b["end"])
    # It got SIGTERM, ignored it, and was still killed (SIGKILL), never reaching its end.
    stubborn = records["stubborn"]
    assert "--ignore-term" in stubborn["argv"]
    assert "sigterm_at" in stubborn and "end" not in stubborn
