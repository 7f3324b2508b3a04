"""GPUs through NVML (nvidia-ml-py's `pynvml`): the driver's own library, no subprocess per poll.

Indices are NVML's, which match nvidia-smi and CUDA when CUDA_DEVICE_ORDER=PCI_BUS_ID (the
runner sets that so CUDA_VISIBLE_DEVICES means the GPU we picked).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, TypeVar

import pynvml  # importing it does not load libnvidia-ml; nvmlInit does

from app.gpus.base import ProbeError
from app.models import GpuSnapshot

T = TypeVar("T")

_MB = 1024**2
# What a driver without memory info v2 answers (the classes exist once pynvml is imported).
_NO_V2 = tuple(
    getattr(pynvml, name)
    for name in (
        "NVMLError_FunctionNotFound",
        "NVMLError_NotSupported",
        "NVMLError_ArgumentVersionMismatch",
    )
    if hasattr(pynvml, name)
)


class NvmlProbe:
    name = "nvml"

    def __init__(self) -> None:
        # nvmlInit happens on the first snapshot (so constructing costs nothing and cannot fail),
        # and is retried on the next one after a failure (the driver may be loaded later).
        self._initialized = False
        # Memory info v2 (driver 510+) until the driver says it has none; then v1 for good.
        self._memory_v2 = hasattr(pynvml, "nvmlMemory_v2")

    def snapshot(self) -> list[GpuSnapshot]:
        if not self._initialized:
            self._call(pynvml.nvmlInit)
            self._initialized = True
        count: int = self._call(pynvml.nvmlDeviceGetCount)
        return [self._device(index) for index in range(count)]

    def close(self) -> None:
        """Release NVML (optional: the process exiting does the same)."""
        if self._initialized:
            self._initialized = False
            # Nothing useful can be done about a failing shutdown.
            with contextlib.suppress(pynvml.NVMLError):
                pynvml.nvmlShutdown()

    def _device(self, index: int) -> GpuSnapshot:
        handle = self._call(pynvml.nvmlDeviceGetHandleByIndex, index)
        name = self._call(pynvml.nvmlDeviceGetName, handle)
        if isinstance(name, bytes):  # older nvidia-ml-py versions return bytes
            name = name.decode("utf-8", errors="replace")
        total, used = self._memory(handle)
        return GpuSnapshot(
            index=index,
            name=str(name),
            memory_total_mb=total // _MB,
            memory_used_mb=used // _MB,
            utilization=self._call(_utilization_or_zero, handle),
        )

    def _memory(self, handle: Any) -> tuple[int, int]:
        """Total and used bytes, as nvidia-smi shows them.

        v1's `used` also counts the memory the driver reserves for itself (615 MiB on an idle
        H200 with driver 580, where nvidia-smi shows 0 MiB used): every GPU would look used by
        "other processes". v2 reports that reservation apart; older drivers lack v2.
        """
        if self._memory_v2:
            try:
                info = pynvml.nvmlDeviceGetMemoryInfo(handle, version=pynvml.nvmlMemory_v2)
            except _NO_V2:
                self._memory_v2 = False
            except pynvml.NVMLError:
                pass  # anything else: v1 below says it again with its own message
            else:
                return int(info.total), int(info.used)
        memory = self._call(pynvml.nvmlDeviceGetMemoryInfo, handle)
        return int(memory.total), int(memory.used)

    def _call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run one NVML call; every NVML error becomes a ProbeError carrying NVML's message."""
        try:
            return fn(*args)
        except pynvml.NVMLError as exc:
            if isinstance(exc, pynvml.NVMLError_Uninitialized):
                self._initialized = False  # someone shut NVML down: init again next time
            raise ProbeError(f"NVML {fn.__name__} failed: {exc}") from exc


def _utilization_or_zero(handle: Any) -> float:
    # Some devices (e.g. MIG instances, some vGPUs) do not report utilisation; memory is still
    # meaningful, so treat the GPU as idle rather than losing it.
    try:
        rates = pynvml.nvmlDeviceGetUtilizationRates(handle)
    except pynvml.NVMLError_NotSupported:
        return 0.0
    return float(rates.gpu) / 100
