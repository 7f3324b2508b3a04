"""GPUs through GPUtil, which runs and parses `nvidia-smi --query-gpu=... --format=csv`.

The fallback when NVML itself cannot be loaded but nvidia-smi works. GPUtil is imported only here,
and lazily, because GPUtil 1.4 does `from distutils import spawn` at import time and Python 3.12
removed distutils: on such a Python we install a tiny stand-in first (see _ensure_distutils).
"""

from __future__ import annotations

import importlib
import math
import shutil
import sys
import types
import warnings
from typing import Any

from app.gpus.base import ProbeError
from app.models import GpuSnapshot


class GputilProbe:
    name = "gputil"

    def __init__(self) -> None:
        self._gputil: Any = None  # the GPUtil module, once imported

    def snapshot(self) -> list[GpuSnapshot]:
        # GPUtil swallows a missing nvidia-smi and returns [], so check first to say why.
        if shutil.which("nvidia-smi") is None:
            raise ProbeError("nvidia-smi not found on PATH (the GPUtil backend needs it)")
        gputil = self._module()
        try:
            gpus = gputil.getGPUs()
        except Exception as exc:
            # e.g. "NVIDIA-SMI has failed because it couldn't communicate with the driver"
            # printed instead of CSV makes GPUtil's parser raise.
            raise ProbeError(f"GPUtil could not read nvidia-smi's output: {exc!r}") from exc
        if not gpus:
            raise ProbeError("nvidia-smi not found or it reported no GPUs")
        return sorted((_snapshot(gpu) for gpu in gpus), key=lambda gpu: gpu.index)

    def _module(self) -> Any:
        if self._gputil is None:
            _ensure_distutils()
            try:
                self._gputil = importlib.import_module("GPUtil")
            except Exception as exc:
                raise ProbeError(f"cannot import GPUtil: {exc!r}") from exc
        return self._gputil


def _snapshot(gpu: Any) -> GpuSnapshot:
    # GPUtil turns unparsable fields ("[N/A]") into NaN.
    total, used, load = float(gpu.memoryTotal), float(gpu.memoryUsed), float(gpu.load)
    if not (math.isfinite(total) and math.isfinite(used)):
        raise ProbeError(f"nvidia-smi reported no memory figures for GPU {gpu.id}")
    return GpuSnapshot(
        index=int(gpu.id),
        name=str(gpu.name),
        memory_total_mb=int(total),
        memory_used_mb=int(used),
        # Utilisation is "[N/A]" on some devices (MIG, vGPU): idle, as the NVML backend does.
        utilization=load if math.isfinite(load) else 0.0,
    )


def _find_executable(executable: str, path: str | None = None) -> str | None:
    """distutils.spawn.find_executable's signature on top of shutil.which."""
    return shutil.which(executable, path=path)


def _ensure_distutils() -> None:
    """Make `from distutils import spawn` work, installing a stand-in where distutils is gone."""
    try:
        with warnings.catch_warnings():
            # 3.11's stdlib distutils warns that it is deprecated on import; that is GPUtil's
            # business, not something our users can act on.
            warnings.simplefilter("ignore", DeprecationWarning)
            importlib.import_module("distutils.spawn")
    except ImportError:
        distutils = types.ModuleType("distutils")
        spawn = types.ModuleType("distutils.spawn")
        spawn.find_executable = _find_executable  # type: ignore[attr-defined]
        distutils.spawn = spawn  # type: ignore[attr-defined]
        sys.modules["distutils"] = distutils
        sys.modules["distutils.spawn"] = spawn
