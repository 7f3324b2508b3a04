"""GPU probes against what this machine really has: files, subprocesses, and NVML/nvidia-smi.

NVML is whatever the machine offers (on a GPU-less CI box: no driver); nvidia-smi is replaced by
a fake executable first on PATH that prints the CSV GPUtil parses.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pynvml
import pytest

from app.gpus import (
    BACKENDS,
    FakeProbe,
    GputilProbe,
    NoGpuBackend,
    NvmlProbe,
    ProbeError,
    TimedProbe,
    make_probe,
    update_fake_gpu,
    write_fake_gpus,
)
from app.models import GpuSnapshot

REPO = Path(__file__).resolve().parent.parent


def _nvml_works() -> bool:
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        return False
    pynvml.nvmlShutdown()
    return True


HAS_NVML = _nvml_works()


# --- fake backend -------------------------------------------------------------------------------


def test_fake_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_fake_gpus(path, 2, memory_total_mb=24576, name="Fake 4090")
    assert FakeProbe(path).snapshot() == [
        GpuSnapshot(0, "Fake 4090", 24576, 0, 0.0),
        GpuSnapshot(1, "Fake 4090", 24576, 0, 0.0),
    ]


def test_fake_sees_a_live_edit_on_the_next_snapshot(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_fake_gpus(path, 2)
    probe = FakeProbe(path)
    assert probe.snapshot()[1].memory_used_mb == 0
    update_fake_gpu(path, 1, memory_used_mb=4096, utilization=0.75)
    gpu = probe.snapshot()[1]
    assert (gpu.memory_used_mb, gpu.utilization) == (4096, 0.75)
    # Hand edits count as much as the helper's.
    path.write_text(json.dumps({"gpus": [{**_gpu(), "name": "Edited"}]}))
    assert [g.name for g in probe.snapshot()] == ["Edited"]


def test_fake_utilization_above_one_is_a_percentage(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    path.write_text(json.dumps({"gpus": [_gpu(utilization=50), _gpu(utilization=1)]}))
    assert [g.utilization for g in FakeProbe(path).snapshot()] == [0.5, 1.0]


def _gpu(**overrides: object) -> dict[str, object]:
    entry: dict[str, object] = {
        "name": "Fake A100",
        "memory_total_mb": 81920,
        "memory_used_mb": 0,
        "utilization": 0.0,
    }
    entry.update(overrides)
    return entry


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "invalid JSON"),
        ('{"gpus": 3}', '{"gpus": [...]}'),
        (json.dumps({"gpus": [_gpu(), {"name": "x"}]}), "gpus[1]: missing key(s) memory_total_mb"),
        (json.dumps({"gpus": [_gpu(memory_used_mb="lots")]}), "gpus[0].memory_used_mb"),
        (json.dumps({"gpus": [_gpu(utilization=True)]}), "gpus[0].utilization"),
        (json.dumps({"gpus": [_gpu(utilization=250)]}), "neither 0-1 nor 0-100"),
        (json.dumps({"gpus": [_gpu(memory_used_mb=90000)]}), "more than the total"),
    ],
)
def test_fake_reports_a_bad_file_with_its_name(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(content)
    with pytest.raises(ProbeError) as info:
        FakeProbe(path).snapshot()
    assert str(path) in str(info.value)
    assert expected in str(info.value)


def test_fake_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"
    with pytest.raises(ProbeError, match=r"absent\.json: cannot read it"):
        FakeProbe(path).snapshot()


def test_update_fake_gpu_refuses_bad_edits_and_keeps_the_file(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_fake_gpus(path, 1)
    before = path.read_text()
    with pytest.raises(ValueError, match="unknown fake GPU field"):
        update_fake_gpu(path, 0, memory_usd_mb=1)
    with pytest.raises(ValueError, match="no GPU 3"):
        update_fake_gpu(path, 3, memory_used_mb=1)
    with pytest.raises(ValueError, match="memory_used_mb"):
        update_fake_gpu(path, 0, memory_used_mb=-1)
    assert path.read_text() == before
    # Only the target remains: the temporary files were renamed or removed.
    assert [p.name for p in tmp_path.iterdir()] == ["gpus.json"]


# --- TimedProbe ---------------------------------------------------------------------------------


class BlockingProbe:
    """Blocks in snapshot() until `release` is set, like NVML on a wedged driver."""

    name = "blocking"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.calls = 0

    def snapshot(self) -> list[GpuSnapshot]:
        self.calls += 1
        self.release.wait()
        return [GpuSnapshot(0, "Slow", 1000, 0, 0.0)]


class FailingProbe:
    name = "failing"

    def __init__(self, error: Exception) -> None:
        self.error = error

    def snapshot(self) -> list[GpuSnapshot]:
        raise self.error


@pytest.fixture
def blocking() -> Iterator[BlockingProbe]:
    probe = BlockingProbe()
    yield probe
    probe.release.set()  # let the worker thread go idle even if the test failed


def test_timed_probe_times_out_then_reports_still_hung_without_new_threads(
    blocking: BlockingProbe,
) -> None:
    timed = TimedProbe(blocking, timeout_s=0.2)
    with pytest.raises(ProbeError, match=r"GPU probe 'blocking' timed out after 0\.2s"):
        timed.snapshot()
    threads = threading.active_count()
    for _ in range(5):
        with pytest.raises(ProbeError, match="still hung since"):
            timed.snapshot()
    assert threading.active_count() == threads
    assert blocking.calls == 1  # the hung call was never repeated

    blocking.release.set()
    assert _first_answer(timed) == [GpuSnapshot(0, "Slow", 1000, 0, 0.0)]
    assert threading.active_count() == threads  # the same worker served the new call


def _first_answer(timed: TimedProbe) -> list[GpuSnapshot]:
    """Poll until the released call has been collected (a wait, not a timing assertion)."""
    for _ in range(2000):
        try:
            return timed.snapshot()
        except ProbeError as exc:
            assert "still hung" in str(exc)
            time.sleep(0.005)
    raise AssertionError("the probe never recovered after being released")


def test_timed_probe_passes_probe_errors_and_wraps_bugs() -> None:
    with pytest.raises(ProbeError, match=r"^driver gone$"):
        TimedProbe(FailingProbe(ProbeError("driver gone"))).snapshot()
    with pytest.raises(ProbeError, match="'failing' failed: KeyError"):
        TimedProbe(FailingProbe(KeyError("x"))).snapshot()


def test_timed_probe_limit_keeps_the_first_gpus(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_fake_gpus(path, 4)
    assert [g.index for g in TimedProbe(FakeProbe(path), limit=2).snapshot()] == [0, 1]
    assert len(TimedProbe(FakeProbe(path), limit=8).snapshot()) == 4
    with pytest.raises(ValueError, match="--gpus"):
        TimedProbe(FakeProbe(path), limit=0)


# --- NVML ---------------------------------------------------------------------------------------


@pytest.mark.skipif(HAS_NVML, reason="needs a machine without a working NVIDIA driver")
def test_nvml_without_a_driver_raises_probe_error() -> None:
    probe = NvmlProbe()
    for _ in range(2):  # init is retried on the next call, and fails the same way
        with pytest.raises(ProbeError, match="NVML nvmlInit failed"):
            probe.snapshot()


@pytest.mark.skipif(not HAS_NVML, reason="needs an NVIDIA driver")
def test_nvml_reports_real_gpus() -> None:
    probe = NvmlProbe()
    gpus = probe.snapshot()
    probe.close()
    assert [g.index for g in gpus] == list(range(len(gpus)))
    for gpu in gpus:
        assert gpu.name
        assert 0 <= gpu.memory_used_mb <= gpu.memory_total_mb
        assert 0.0 <= gpu.utilization <= 1.0


@pytest.mark.skipif(
    not HAS_NVML or shutil.which("nvidia-smi") is None, reason="needs an NVIDIA GPU"
)
def test_nvml_memory_matches_nvidia_smi() -> None:
    # NVML's v1 memory info counts the driver's own reservation as used (615 MiB on an idle
    # H200): the probe reads v2, which nvidia-smi shows. Within 64 MiB: the GPU may be in use.
    probe = NvmlProbe()
    gpus = probe.snapshot()
    probe.close()
    out = subprocess.run(
        ["nvidia-smi", "--query-gpu=index,memory.total,memory.used",
         "--format=csv,noheader,nounits"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    smi = {int(i): (int(t), int(u)) for i, t, u in (line.split(",") for line in out.splitlines())}
    for gpu in gpus:
        total, used = smi[gpu.index]
        assert gpu.memory_total_mb == total
        assert abs(gpu.memory_used_mb - used) <= 64, (gpu, used)


# --- GPUtil with a fake nvidia-smi ---------------------------------------------------------------

FAKE_SMI_CSV = (
    "0, GPU-aaaa, 37, 81920, 1024, 80896, 550.54, Fake H100, 123, Disabled, Enabled, 41\n"
    "1, GPU-bbbb, [N/A], 81920, 0, 81920, 550.54, Fake H100, 124, Disabled, Enabled, 38\n"
)
FAKE_SMI_GPUS = [
    GpuSnapshot(0, "Fake H100", 81920, 1024, 0.37),
    GpuSnapshot(1, "Fake H100", 81920, 0, 0.0),
]


def _install_nvidia_smi(bin_dir: Path, stdout: str, exit_code: int = 0) -> None:
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "stdout.txt").write_text(stdout)
    script = bin_dir / "nvidia-smi"
    # Refuses any query other than GPUtil's, so a GPUtil change would show up here.
    script.write_text(
        "#!/bin/sh\n"
        'case "$1" in --query-gpu=index,uuid,utilization.gpu,memory.total,memory.used,*) ;;\n'
        '  *) echo "fake nvidia-smi: unexpected $*" >&2; exit 2;; esac\n'
        f'cat "{bin_dir / "stdout.txt"}"\n'
        f"exit {exit_code}\n"
    )
    script.chmod(0o755)


@pytest.fixture
def smi_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory first on PATH, where a test may put a fake nvidia-smi."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir


def test_gputil_without_nvidia_smi(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ProbeError, match="nvidia-smi not found"):
        GputilProbe().snapshot()


def test_gputil_reads_the_fake_nvidia_smi(smi_dir: Path) -> None:
    _install_nvidia_smi(smi_dir, FAKE_SMI_CSV)
    assert GputilProbe().snapshot() == FAKE_SMI_GPUS


def test_gputil_no_gpus_reported(smi_dir: Path) -> None:
    _install_nvidia_smi(smi_dir, "")
    with pytest.raises(ProbeError, match="nvidia-smi not found or it reported no GPUs"):
        GputilProbe().snapshot()


def test_gputil_failing_nvidia_smi(smi_dir: Path) -> None:
    message = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver.\n"
    _install_nvidia_smi(smi_dir, message, exit_code=9)
    with pytest.raises(ProbeError, match="GPUtil could not read nvidia-smi's output"):
        GputilProbe().snapshot()


def test_gputil_imports_without_distutils(smi_dir: Path) -> None:
    """Python 3.12 has no distutils: blocked here, GPUtil must still import via our shim."""
    _install_nvidia_smi(smi_dir, FAKE_SMI_CSV)
    code = (
        "import sys\n"
        "sys.modules['distutils'] = None  # `import distutils` now raises ImportError\n"
        "sys.modules['distutils.spawn'] = None\n"
        "from app.gpus.gputil import GputilProbe, _find_executable\n"
        "gpus = GputilProbe().snapshot()\n"
        "assert sys.modules['distutils'].spawn.find_executable is _find_executable\n"
        "print([(g.index, g.name, g.memory_used_mb, g.utilization) for g in gpus])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[(0, 'Fake H100', 1024, 0.37), (1, 'Fake H100', 0, 0.0)]"


# --- make_probe ---------------------------------------------------------------------------------


def test_backends() -> None:
    assert BACKENDS == ("auto", "nvml", "gputil", "fake")


def test_make_probe_fake(tmp_path: Path) -> None:
    path = tmp_path / "gpus.json"
    write_fake_gpus(path, 3)
    probe = make_probe("fake", path, timeout_s=1.0, limit=2)
    assert probe.name == "fake"
    assert len(probe.snapshot()) == 2
    assert make_probe("auto", path).name == "fake"  # a fake file given means simulate


def test_make_probe_usage_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--gpu-backend fake needs --fake-gpus FILE"):
        make_probe("fake", None)
    with pytest.raises(ValueError, match="unknown GPU backend 'cuda'"):
        make_probe("cuda", None)
    with pytest.raises(ValueError, match="--fake-gpus only works with --gpu-backend fake"):
        make_probe("nvml", tmp_path / "gpus.json")


@pytest.mark.skipif(HAS_NVML, reason="needs a machine without a working NVIDIA driver")
def test_make_probe_auto_without_gpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # and no nvidia-smi either
    with pytest.raises(NoGpuBackend) as info:
        make_probe("auto", None, timeout_s=2.0)
    message = str(info.value)
    assert "no NVIDIA GPU was found" in message
    assert "NVML: NVML nvmlInit failed" in message
    assert "GPUtil: nvidia-smi not found" in message
    assert "--gpu-backend fake --fake-gpus FILE" in message
    assert set(info.value.reasons) == {"NVML", "GPUtil"}


@pytest.mark.skipif(HAS_NVML, reason="with a driver, auto picks NVML before GPUtil")
def test_make_probe_auto_falls_back_to_gputil(smi_dir: Path) -> None:
    _install_nvidia_smi(smi_dir, FAKE_SMI_CSV)
    probe = make_probe("auto", None, limit=1)
    assert probe.name == "gputil"
    assert probe.snapshot() == FAKE_SMI_GPUS[:1]


@pytest.mark.skipif(not HAS_NVML, reason="needs an NVIDIA driver")
def test_make_probe_auto_picks_nvml() -> None:
    probe = make_probe("auto", None)
    assert probe.name == "nvml"
    assert probe.snapshot()
